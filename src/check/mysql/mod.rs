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
use mysql_async::{ClientIdentity, Conn, OptsBuilder, SslOpts, Value};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::debug;

mod verdict;

use self::verdict::value_is_on;
pub use self::verdict::{
    GaleraError, cause_of_code, classify, galera_verdict, is_connection_lost, must_recycle, saturated,
};
use crate::check::io::Phase;
use crate::check::tls::TlsSettings;
use crate::check::{ABANDON_AFTER, Cause, Check, CheckError, Details, most_telling};
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
    /// The passwords sent so far, kept out of published messages.
    secrets: crate::check::text::KnownSecrets,
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
            secrets: Default::default(),
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
        if let Some(pw) = &password {
            self.secrets.remember(pw);
        }
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
    fn secrets(&self) -> Vec<String> {
        self.secrets.snapshot()
    }

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
}
