//! `type: redis`: `PING` (and `ROLE` when a master is required) over one
//! persistent connection, optionally following a Redis Sentinel to the
//! current master.
//!
//! The check speaks RESP2 itself over its own socket (TCP or TLS) instead of going
//! through the `redis` crate's connection types: a probe has to tell a
//! connect timeout from a read timeout, classify every error reply by its
//! code, and must never be hidden behind a reconnecting manager or a
//! background driver task. The handful of commands it sends (`AUTH`,
//! `SELECT`, `INFO server`, `PING`, `ROLE`, `SENTINEL
//! get-master-addr-by-name`, `QUIT`) and the replies it reads are tiny;
//! owning the socket keeps every step under the check's deadline.

mod resp;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, info};

use self::resp::{Framer, MAX_REPLY, Reply, RespError, encode, parse, truncate};
use super::io::{Phase, exchange, io_error};
use super::text::{self, KnownSecrets};
use super::tls::{self, Stream, TlsSettings};
use super::{Cause, Check, CheckError, Details, most_telling};
use crate::config::{DependencyConfig, HostPort, Secret, SecretSource};
pub use crate::config::{RedisSettings, SentinelSettings, Target};
use crate::net::remaining;

/// Classifies an error reply by its code (the first word).
fn classify_error(e: &str) -> Cause {
    let code = e.split_whitespace().next().unwrap_or("");
    match code {
        "LOADING" => Cause::Loading,
        "MASTERDOWN" => Cause::MasterDown,
        "BUSY" => Cause::Busy,
        "NOAUTH" | "WRONGPASS" | "NOPERM" => Cause::Auth,
        // Redis before 6 answers a wrong password with a plain ERR.
        "ERR" if e.to_ascii_lowercase().starts_with("err invalid password") => Cause::Auth,
        // Sent right after accept when `maxclients` is reached, then the server closes.
        "ERR" if e.starts_with("ERR max number of clients reached") => Cause::TooManyConnections,
        _ => Cause::ServerError,
    }
}

/// The error for an error reply to `what`.
fn error_reply(what: &str, e: &str) -> CheckError {
    CheckError::new(classify_error(e), format!("{what} answered -{}", truncate(e.to_string())))
}

/// The error for a reply of the wrong shape.
fn unexpected(what: &str, r: &Reply, expected: &str) -> CheckError {
    CheckError::new(Cause::Protocol, format!("{what} answered {}, expected {expected}", r.describe()))
}

/// One open connection to a Redis node or sentinel.
struct Conn {
    stream: Stream,
    /// The bytes of the reply being read (never more than one reply).
    buf: Vec<u8>,
    /// Walks `buf` as it grows, so a reply in many pieces is examined once.
    /// (Boxed: a check holds two connections, and the check enum stays small.)
    framer: Box<Framer>,
    peer: SocketAddr,
}

impl Conn {
    async fn open(target: &HostPort, tls: Option<&TlsSettings>, deadline: Instant) -> Result<Conn, CheckError> {
        let (stream, peer) = tls::connect(target, tls, deadline).await?;
        Ok(Conn { stream, buf: Vec::with_capacity(4096), framer: Box::default(), peer })
    }

    /// Sends one command and reads its reply, by `deadline`.
    ///
    /// Redis speaks only when asked: a byte that arrived before the command
    /// (a stray reply, junk, an answer ahead of the question) would be taken
    /// as this command's answer, so it is a protocol error instead, and the
    /// caller drops the connection.
    async fn call(&mut self, args: &[&[u8]], deadline: Instant, what: &str) -> Result<Reply, CheckError> {
        self.nothing_unasked(what)?;
        exchange(deadline, what, self.stream.write_all(&encode(args))).await?;
        self.read_reply(deadline, what).await
    }

    /// Fails when the server sent anything since the last reply; a closed
    /// connection is a `reset` (the server's idle `timeout`: worth a retry).
    /// An error reply is the one thing Redis sends unasked (`-ERR max number
    /// of clients reached` right after accepting): it keeps its own cause.
    fn nothing_unasked(&mut self, what: &str) -> Result<(), CheckError> {
        let mut probe = [0u8; 512];
        match self.stream.try_read(&mut probe) {
            Ok(0) => Err(CheckError::new(Cause::Reset, format!("{what}: connection closed by {}", self.peer))),
            Ok(n) => {
                if let Ok((Reply::Error(e), used)) = parse(&probe[..n])
                    && used == n
                {
                    return Err(error_reply("before the command was sent, the server", &e));
                }
                Err(CheckError::new(
                    Cause::Protocol,
                    format!(
                        "{what}: the server sent bytes nobody asked for ({})",
                        text::clip_bytes(&probe[..n.min(24)], 24)
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(io_error(&e, Phase::Exchange, what)),
        }
    }

    async fn read_reply(&mut self, deadline: Instant, what: &str) -> Result<Reply, CheckError> {
        let protocol = |e: RespError| CheckError::new(Cause::Protocol, format!("{what}: {e}"));
        loop {
            if let Some(end) = self.framer.advance(&self.buf).map_err(protocol)? {
                // Parsed once, when whole.
                let (reply, _) = parse(&self.buf[..end]).map_err(protocol)?;
                let extra = self.buf.len() - end;
                self.buf.clear();
                *self.framer = Framer::default();
                if extra > 0 {
                    return Err(CheckError::new(
                        Cause::Protocol,
                        format!("{what}: {extra} more bytes followed the reply ({})", reply.describe()),
                    ));
                }
                return Ok(reply);
            }
            if self.buf.len() > MAX_REPLY {
                return Err(CheckError::new(Cause::Protocol, format!("{what}: reply larger than 1 MiB")));
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = exchange(deadline, what, self.stream.read(&mut chunk)).await?;
            if n == 0 {
                return Err(CheckError::new(Cause::Reset, format!("{what}: connection closed by {}", self.peer)));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// `AUTH [username] password`; any error reply is an `auth` failure.
    async fn auth(
        &mut self,
        username: Option<&str>,
        password: &str,
        deadline: Instant,
        what: &str,
    ) -> Result<(), CheckError> {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(u) = username {
            args.push(u.as_bytes());
        }
        args.push(password.as_bytes());
        match self.call(&args, deadline, what).await? {
            Reply::Status(s) if s == "OK" => Ok(()),
            Reply::Error(e) => {
                // A refusal of the credentials is `auth` whatever its code
                // (WRONGPASS, "ERR invalid password", "ERR AUTH <password>
                // called without any password configured"); other errors
                // (maxclients, LOADING) keep their own cause.
                let cause = match classify_error(&e) {
                    Cause::ServerError if e.contains("AUTH") || e.to_ascii_lowercase().contains("password") => {
                        Cause::Auth
                    }
                    c => c,
                };
                Err(CheckError::new(cause, format!("{what} rejected: -{}", truncate(e.to_string()))))
            }
            other => Err(unexpected(what, &other, "+OK")),
        }
    }

    /// Sends `QUIT` and waits for its answer, best effort.
    async fn quit(mut self, deadline: Instant) {
        if self.call(&[b"QUIT"], deadline, "QUIT").await.is_ok() {
            let _ = timeout_at(deadline, self.stream.shutdown()).await;
        }
    }
}

/// Reads a configured secret, classifying a failure as `config`.
fn read_secret(src: &Option<SecretSource>) -> Result<Option<Secret>, CheckError> {
    match src {
        None => Ok(None),
        Some(s) => s.read().map(Some).map_err(|e| CheckError::new(Cause::Config, e.to_string())),
    }
}

/// The `redis` check: one persistent connection, re-established (and, with
/// a sentinel, re-discovered) when it breaks.
pub struct RedisCheck {
    settings: RedisSettings,
    name: String,
    /// Sentinels in the order to ask them: those whose answer was last
    /// confirmed by the master first, those that named a non-master last.
    sentinels: Vec<HostPort>,
    /// The connection to the first sentinel, kept between checks.
    sentinel_conn: Option<(HostPort, Conn)>,
    /// The connection to the checked node (with a sentinel: `current_master`).
    conn: Option<Conn>,
    version: Option<String>,
    current_master: Option<HostPort>,
    /// The passwords sent so far, kept out of published messages.
    secrets: Box<KnownSecrets>,
}

impl RedisCheck {
    /// Builds the check.
    pub fn new(settings: RedisSettings, dep: &DependencyConfig) -> Self {
        let sentinels = match &settings.target {
            Target::Sentinel(s) => s.addresses.clone(),
            Target::Direct(_) => Vec::new(),
        };
        RedisCheck {
            settings,
            name: dep.name.clone(),
            sentinels,
            sentinel_conn: None,
            conn: None,
            version: None,
            current_master: None,
            secrets: Box::default(),
        }
    }

    fn uses_sentinel(&self) -> bool {
        matches!(self.settings.target, Target::Sentinel(_))
    }

    /// Connects to `target`, authenticates, selects the database and reads
    /// the server version.
    async fn connect(&mut self, target: &HostPort, deadline: Instant) -> Result<Conn, CheckError> {
        let password = read_secret(&self.settings.password)?;
        if let Some(pw) = &password {
            self.secrets.remember(pw.expose());
        }
        let mut conn = Conn::open(target, self.settings.tls.as_ref(), deadline).await?;
        if let Some(pw) = &password {
            conn.auth(self.settings.username.as_deref(), pw.expose(), deadline, "AUTH").await?;
        }
        if self.settings.db != 0 {
            let db = self.settings.db.to_string();
            match conn.call(&[b"SELECT", db.as_bytes()], deadline, "SELECT").await? {
                Reply::Status(s) if s == "OK" => {}
                Reply::Error(e) => return Err(error_reply(&format!("SELECT {db}"), &e)),
                other => return Err(unexpected("SELECT", &other, "+OK")),
            }
        }
        // The version is a courtesy for /status: an access error (NOPERM for
        // a restricted ACL user, NOAUTH that PING reports next) or a renamed
        // INFO is ignored; any other error reply (maxclients, BUSY) is the verdict.
        match conn.call(&[b"INFO", b"server"], deadline, "INFO server").await? {
            Reply::Bulk(info) => {
                let info = String::from_utf8_lossy(&info);
                if let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
                    self.version = Some(text::clip(v.trim(), text::MAX_DETAIL));
                }
            }
            Reply::Error(e) if classify_error(&e) == Cause::Auth || e.starts_with("ERR unknown command") => {}
            Reply::Error(e) => return Err(error_reply("INFO server", &e)),
            _ => {}
        }
        Ok(conn)
    }

    /// One probe on an open connection: `PING`, then `ROLE` if a master is required.
    async fn probe(&self, conn: &mut Conn, deadline: Instant) -> Result<(), CheckError> {
        match conn.call(&[b"PING"], deadline, "PING").await? {
            Reply::Status(s) if s == "PONG" => {}
            Reply::Error(e) => return Err(error_reply("PING", &e)),
            other => return Err(unexpected("PING", &other, "+PONG")),
        }
        if !self.settings.require_master {
            return Ok(());
        }
        let reply = conn.call(&[b"ROLE"], deadline, "ROLE").await?;
        let role = match &reply {
            Reply::Array(items) => items.first().and_then(Reply::as_text),
            Reply::Error(e) => return Err(error_reply("ROLE", e)),
            _ => None,
        };
        match role.as_deref() {
            Some("master") => Ok(()),
            Some("slave") => {
                let of = match &reply {
                    Reply::Array(items) => match (items.get(1).and_then(Reply::as_text), items.get(2)) {
                        (Some(host), Some(Reply::Int(port))) => format!(" of {host}:{port}"),
                        _ => String::new(),
                    },
                    _ => String::new(),
                };
                Err(CheckError::new(Cause::NotMaster, format!("{} is a replica{of}", conn.peer)))
            }
            Some("sentinel") => Err(CheckError::new(Cause::NotMaster, format!("{} is a sentinel", conn.peer))),
            _ => Err(unexpected("ROLE", &reply, "an array naming the role")),
        }
    }

    /// Checks through the sentinels: asks them for the master on every check,
    /// probes the node they name, and when that node is not master asks the
    /// remaining sentinels before judging.
    ///
    /// The first sentinel that answers costs one round trip on a connection
    /// kept from one check to the next, so a failover is followed within one
    /// interval. One sentinel is trusted only as far as `ROLE` confirms it:
    /// when the node it names says it is not master, the sentinels not asked
    /// yet are asked too and the address named by the most of them (an
    /// address already found not to be master loses ties) is probed instead.
    /// A sentinel moves to the front of the list only when the master it
    /// named was confirmed; one that named a node that is not master moves
    /// to the back.
    async fn check_sentinel(&mut self, deadline: Instant) -> Result<(), CheckError> {
        let Target::Sentinel(s) = &self.settings.target else { unreachable!("sentinel check without sentinel") };
        let master_name = s.master_name.clone();
        let password = read_secret(&s.password)?;
        if let Some(pw) = &password {
            self.secrets.remember(pw.expose());
        }
        let pw = password.as_ref().map(Secret::expose);
        let tls = self.settings.tls.clone();
        let n = self.sentinels.len();
        // One share of the time is kept back for the master.
        let phase_end = Instant::now() + remaining(deadline) * n as u32 / (n as u32 + 1);
        let mut failures: Vec<(String, CheckError)> = Vec::new();
        let mut first = None;
        for i in 0..n {
            let share_end = Instant::now() + remaining(phase_end) / (n - i) as u32;
            let sentinel = self.sentinels[i].clone();
            let kept = self.sentinel_conn.take_if(|(a, _)| *a == sentinel).map(|(_, c)| c);
            match ask_kept(kept, &sentinel, &master_name, pw, tls.as_ref(), share_end).await {
                Ok((master, conn)) => {
                    first = Some((i, master, conn));
                    break;
                }
                Err(e) => {
                    debug!(dependency = %self.name, sentinel = %sentinel, cause = %e.cause, "sentinel did not answer");
                    failures.push((sentinel.to_string(), e));
                }
            }
        }
        let Some((asked, named, sentinel_conn)) = first else {
            // A sentinel that answered but could not help (unknown master
            // name, rejected password, nonsense) says more than one that is down.
            let cause = most_telling(failures.iter().map(|(_, e)| e)).map_or(Cause::Config, |i| failures[i].1.cause);
            let list = failures.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; ");
            return Err(CheckError::new(cause, format!("no sentinel named the master {master_name:?}: {list}")));
        };
        let answered_by = self.sentinels[asked].clone();
        self.switch_to(&named);
        let mut result = self.probe_node(&named, deadline).await;
        let mut answers = vec![(asked, named.clone())];
        let mut confirmed = result.is_ok().then(|| named.clone());
        if let Err(e) = &result
            && matches!(e.cause, Cause::NotMaster | Cause::MasterDown)
            && asked + 1 < n
        {
            // Those listed before `asked` have already failed in this check.
            let others_end = Instant::now() + remaining(deadline) / 2;
            for j in asked + 1..n {
                let share_end = Instant::now() + remaining(others_end) / (n - j) as u32;
                let sentinel = self.sentinels[j].clone();
                match ask_sentinel(&sentinel, &master_name, pw, tls.as_ref(), share_end).await {
                    Ok(master) => answers.push((j, master)),
                    Err(e) => {
                        debug!(dependency = %self.name, sentinel = %sentinel, cause = %e.cause, "sentinel did not answer")
                    }
                }
            }
            let (winner, votes) = most_named(&answers, Some(&named)).expect("at least the first answer");
            let winner = winner.clone();
            if winner == named {
                let message = format!("{}; {votes} of {} sentinels that answered name it", e.message, answers.len());
                result = Err(CheckError::new(e.cause, message));
            } else {
                info!(dependency = %self.name, named_by_one = %named, named_by_most = %winner, votes,
                    "the node a sentinel named is not master; checking the one most sentinels name");
                self.switch_to(&winner);
                result = self.probe_node(&winner, deadline).await;
                confirmed = result.is_ok().then_some(winner);
            }
        }
        if let Some(master) = &confirmed {
            let right: Vec<usize> = answers.iter().filter(|(_, a)| a == master).map(|(i, _)| *i).collect();
            let wrong: Vec<usize> = answers.iter().filter(|(_, a)| a != master).map(|(i, _)| *i).collect();
            reorder(&mut self.sentinels, &right, &wrong);
        }
        // The connection is kept only to the sentinel asked first next time.
        if self.sentinels[0] == answered_by {
            self.sentinel_conn = Some((answered_by, sentinel_conn));
        }
        result
    }

    /// Makes `node` the node checked: a connection to another node is dropped.
    fn switch_to(&mut self, node: &HostPort) {
        if self.current_master.as_ref() == Some(node) {
            return;
        }
        if let Some(old) = &self.current_master {
            info!(dependency = %self.name, from = %old, to = %node, "sentinel names a new redis master");
        }
        self.conn = None;
        self.current_master = Some(node.clone());
    }

    /// Probes `target` on the kept connection, or on a new one when there is
    /// none or the kept one turns out closed (once per check).
    async fn probe_node(&mut self, target: &HostPort, deadline: Instant) -> Result<(), CheckError> {
        // The connection is taken out for the duration of the probe: if the
        // monitor cancels this future mid-exchange, the half-read connection
        // is dropped with it and the next check starts clean.
        if let Some(mut conn) = self.conn.take() {
            match self.probe(&mut conn, deadline).await {
                Ok(()) => {
                    self.conn = Some(conn);
                    return Ok(());
                }
                // The server closed an idle connection (`timeout`), restarted, or failed over.
                Err(e) if e.cause == Cause::Reset && !remaining(deadline).is_zero() => {
                    debug!(dependency = %self.name, cause = %e.cause, "redis connection lost; reconnecting once");
                }
                Err(e) => {
                    if self.keeps_connection(e.cause) {
                        self.conn = Some(conn);
                    }
                    return Err(e);
                }
            }
        }
        let mut conn = match self.connect(target, deadline).await {
            Ok(c) => c,
            Err(e) if self.uses_sentinel() => {
                return Err(CheckError::new(e.cause, format!("master {target} (named by sentinel): {}", e.message)));
            }
            Err(e) => return Err(e),
        };
        let result = self.probe(&mut conn, deadline).await;
        let keep = match &result {
            Ok(()) => true,
            Err(e) => self.keeps_connection(e.cause),
        };
        if keep {
            self.conn = Some(conn);
        }
        result
    }

    /// Whether a connection that produced `cause` can serve the next check:
    /// only after a complete error reply (the stream is still in step) and
    /// when the node is still the one to check.
    fn keeps_connection(&self, cause: Cause) -> bool {
        match cause {
            Cause::Loading | Cause::Busy | Cause::ServerError => true,
            // With a sentinel, a demoted node means: ask again next time.
            Cause::NotMaster | Cause::MasterDown => !self.uses_sentinel(),
            _ => false,
        }
    }
}

/// The address named by the most sentinels in `answers` (sentinel index,
/// address named), with its number of votes. Among equals, an address other
/// than `loses_ties` wins, then the one named by the sentinel listed first.
fn most_named<'a>(answers: &'a [(usize, HostPort)], loses_ties: Option<&HostPort>) -> Option<(&'a HostPort, usize)> {
    // (votes, not the refuted node, listed earliest): the larger wins.
    type Rank = (usize, bool, std::cmp::Reverse<usize>);
    let mut best: Option<(&HostPort, Rank)> = None;
    for (_, addr) in answers {
        let named_by = answers.iter().filter(|(_, a)| a == addr);
        let votes = named_by.clone().count();
        let first = named_by.map(|(i, _)| *i).min().unwrap_or(usize::MAX);
        let rank = (votes, Some(addr) != loses_ties, std::cmp::Reverse(first));
        if best.as_ref().is_none_or(|(_, r)| rank > *r) {
            best = Some((addr, rank));
        }
    }
    best.map(|(addr, (votes, _, _))| (addr, votes))
}

/// Reorders the sentinel list after a master was confirmed: the sentinels
/// that named it (`right`) first, then those not heard from, then those that
/// named a node that is not master (`wrong`); each group keeps its order.
fn reorder(sentinels: &mut Vec<HostPort>, right: &[usize], wrong: &[usize]) {
    let group = |i: usize| {
        if right.contains(&i) {
            0
        } else if wrong.contains(&i) {
            2
        } else {
            1
        }
    };
    let mut indexed: Vec<(usize, HostPort)> = std::mem::take(sentinels).into_iter().enumerate().collect();
    indexed.sort_by_key(|(i, _)| group(*i));
    *sentinels = indexed.into_iter().map(|(_, s)| s).collect();
}

/// Opens a connection to a sentinel and authenticates, by `deadline`.
async fn open_sentinel(
    sentinel: &HostPort,
    password: Option<&str>,
    tls: Option<&TlsSettings>,
    deadline: Instant,
) -> Result<Conn, CheckError> {
    let mut conn = Conn::open(sentinel, tls, deadline).await?;
    if let Some(pw) = password {
        conn.auth(None, pw, deadline, "sentinel AUTH").await?;
    }
    Ok(conn)
}

/// Asks a sentinel on an open connection for the address of `master_name`.
async fn query_sentinel(conn: &mut Conn, master_name: &str, deadline: Instant) -> Result<HostPort, CheckError> {
    let what = "SENTINEL get-master-addr-by-name";
    let reply = conn.call(&[b"SENTINEL", b"get-master-addr-by-name", master_name.as_bytes()], deadline, what).await?;
    match &reply {
        Reply::Array(items) if items.len() == 2 => {
            let host = items[0].as_text();
            let port = items[1].as_text().and_then(|p| p.parse::<u16>().ok());
            match (host, port) {
                (Some(host), Some(port)) if !host.is_empty() => Ok(HostPort { host, port }),
                _ => Err(unexpected(what, &reply, "[ip, port]")),
            }
        }
        Reply::Nil => {
            Err(CheckError::new(Cause::NotFound, format!("sentinel does not monitor a master {master_name:?}")))
        }
        Reply::Error(e) => Err(error_reply(what, e)),
        _ => Err(unexpected(what, &reply, "[ip, port]")),
    }
}

/// Asks a sentinel on `kept` (its connection from an earlier check) or, when
/// there is none or it was closed meanwhile (a restarted sentinel), on a new
/// one; returns the answer and the connection.
async fn ask_kept(
    kept: Option<Conn>,
    sentinel: &HostPort,
    master_name: &str,
    password: Option<&str>,
    tls: Option<&TlsSettings>,
    deadline: Instant,
) -> Result<(HostPort, Conn), CheckError> {
    if let Some(mut conn) = kept {
        match query_sentinel(&mut conn, master_name, deadline).await {
            Ok(master) => return Ok((master, conn)),
            Err(e) if e.cause == Cause::Reset && !remaining(deadline).is_zero() => {}
            Err(e) => return Err(e),
        }
    }
    let mut conn = open_sentinel(sentinel, password, tls, deadline).await?;
    let master = query_sentinel(&mut conn, master_name, deadline).await?;
    Ok((master, conn))
}

/// Asks one sentinel for the address of `master_name` on a connection of
/// its own, by `deadline`.
async fn ask_sentinel(
    sentinel: &HostPort,
    master_name: &str,
    password: Option<&str>,
    tls: Option<&TlsSettings>,
    deadline: Instant,
) -> Result<HostPort, CheckError> {
    let mut conn = open_sentinel(sentinel, password, tls, deadline).await?;
    let answer = query_sentinel(&mut conn, master_name, deadline).await;
    // Sentinels do not log client disconnects; a FIN is enough.
    let _ = timeout_at(deadline, conn.stream.shutdown()).await;
    answer
}

impl Check for RedisCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        match &self.settings.target {
            Target::Direct(hp) => {
                let hp = hp.clone();
                self.probe_node(&hp, deadline).await
            }
            Target::Sentinel(_) => self.check_sentinel(deadline).await,
        }
    }

    fn details(&self) -> Details {
        Details {
            server_version: self.version.clone(),
            current_master: self.current_master.as_ref().map(|m| m.to_string()),
            nodes: Vec::new(),
        }
    }

    async fn close(&mut self, deadline: Instant) {
        if let Some(conn) = self.conn.take() {
            conn.quit(deadline).await;
        }
        if let Some((_, mut conn)) = self.sentinel_conn.take() {
            // Sentinels do not log client disconnects; a FIN is enough.
            let _ = timeout_at(deadline, conn.stream.shutdown()).await;
        }
    }

    fn secrets(&self) -> Vec<String> {
        self.secrets.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort { host: host.into(), port }
    }

    #[test]
    fn error_codes_map_to_causes() {
        let cases = [
            ("LOADING Redis is loading the dataset in memory", Cause::Loading),
            ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", Cause::MasterDown),
            ("BUSY Redis is busy running a script.", Cause::Busy),
            ("NOAUTH Authentication required.", Cause::Auth),
            ("WRONGPASS invalid username-password pair or user is disabled.", Cause::Auth),
            ("ERR invalid password", Cause::Auth),
            ("NOPERM this user has no permissions to run the 'ping' command", Cause::Auth),
            ("ERR unknown command 'PING'", Cause::ServerError),
            ("ERR max number of clients reached", Cause::TooManyConnections),
            ("BUSYKEY Target key name already exists.", Cause::ServerError),
        ];
        for (e, cause) in cases {
            assert_eq!(classify_error(e), cause, "{e}");
        }
    }

    /// A fake RESP server answering each command line with the next scripted
    /// reply (classification only; real-server behaviour is in tests/redis.rs).
    async fn fake(replies: Vec<&'static str>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut replies = replies.into_iter();
            loop {
                let mut chunk = [0u8; 1024];
                let Ok(n) = s.read(&mut chunk).await else { return };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                // Each complete request is one RESP array.
                while let Ok((_, used)) = parse(&buf) {
                    buf.drain(..used);
                    match replies.next() {
                        Some(r) => s.write_all(r.as_bytes()).await.unwrap(),
                        None => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                    }
                }
            }
        });
        port
    }

    fn check_for(port: u16, require_master: bool) -> RedisCheck {
        let s = RedisSettings {
            target: Target::Direct(hp("127.0.0.1", port)),
            username: None,
            password: None,
            db: 0,
            require_master,
            tls: None,
        };
        RedisCheck {
            settings: s,
            name: "t".into(),
            sentinels: vec![],
            sentinel_conn: None,
            conn: None,
            version: None,
            current_master: None,
            secrets: Box::default(),
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    const INFO: &str = "$31\r\n# Server\r\nredis_version:7.2.4\r\n\r\n";

    #[tokio::test]
    async fn error_replies_to_ping_get_their_own_causes() {
        let cases = [
            ("-LOADING Redis is loading the dataset in memory\r\n", Cause::Loading),
            ("-MASTERDOWN Link with MASTER is down\r\n", Cause::MasterDown),
            ("-BUSY Redis is busy running a script.\r\n", Cause::Busy),
            ("-NOAUTH Authentication required.\r\n", Cause::Auth),
            ("-ERR something odd\r\n", Cause::ServerError),
            ("+OK\r\n", Cause::Protocol),
            ("$4\r\nPONG\r\n", Cause::Protocol),
        ];
        for (reply, cause) in cases {
            let port = fake(vec![INFO, reply]).await;
            let mut c = check_for(port, false);
            let err = c.check(soon()).await.unwrap_err();
            assert_eq!(err.cause, cause, "{reply:?}: {err}");
            assert_eq!(c.details().server_version.as_deref(), Some("7.2.4"));
        }
    }

    #[tokio::test]
    async fn loading_keeps_the_connection_and_recovers_on_it() {
        let port = fake(vec![INFO, "-LOADING Redis is loading the dataset in memory\r\n", "+PONG\r\n"]).await;
        let mut c = check_for(port, false);
        assert_eq!(c.check(soon()).await.unwrap_err().cause, Cause::Loading);
        // The fake accepts only one connection: success proves reuse.
        c.check(soon()).await.unwrap();
    }

    #[tokio::test]
    async fn maxclients_on_connect_is_too_many_connections() {
        let port = fake(vec!["-ERR max number of clients reached\r\n"]).await;
        let err = check_for(port, false).check(soon()).await.unwrap_err();
        assert_eq!(err.cause, Cause::TooManyConnections, "{err}");
    }

    #[tokio::test]
    async fn non_redis_server_is_a_protocol_error() {
        let port = fake(vec!["HTTP/1.1 400 Bad Request\r\n\r\n"]).await;
        let err = check_for(port, false).check(soon()).await.unwrap_err();
        assert_eq!(err.cause, Cause::Protocol, "{err}");
    }

    #[tokio::test]
    async fn role_replica_is_not_master() {
        let port =
            fake(vec![INFO, "+PONG\r\n", "*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:1\r\n"])
                .await;
        let err = check_for(port, true).check(soon()).await.unwrap_err();
        assert_eq!(err.cause, Cause::NotMaster);
        assert!(err.message.contains("replica of 127.0.0.1:6379"), "{err}");
    }

    #[tokio::test]
    async fn silent_server_is_a_read_timeout_at_the_deadline() {
        let port = fake(vec![]).await;
        let err = check_for(port, false).check(Instant::now() + Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(err.cause, Cause::ReadTimeout, "{err}");
        // The wait ends at the deadline itself, whatever the machine's load:
        // with a deadline already passed, the reply is read once, then the
        // call times out without waiting.
        let port = fake(vec![]).await;
        let mut conn = Conn::open(&hp("127.0.0.1", port), None, soon()).await.unwrap();
        let call = conn.call(&[b"PING"], Instant::now(), "PING");
        let err = tokio::time::timeout(Duration::ZERO, call).await.expect("no wait past the deadline").unwrap_err();
        assert_eq!(err.cause, Cause::ReadTimeout, "{err}");
    }

    #[tokio::test]
    async fn missing_password_file_is_a_config_failure_without_connecting() {
        let mut c = check_for(1, false);
        c.settings.password = Some(SecretSource::File("/nonexistent/healthgate-redis-pw".into()));
        let err = c.check(soon()).await.unwrap_err();
        assert_eq!(err.cause, Cause::Config, "{err}");
    }

    #[test]
    fn the_master_named_by_most_sentinels_wins_and_a_refuted_node_loses_ties() {
        let (m, r, x) = (hp("10.0.0.1", 6379), hp("10.0.0.2", 6379), hp("10.0.0.3", 6379));
        assert_eq!(most_named(&[], None), None);
        // One wrong sentinel listed first against three right ones.
        let a = [(0, r.clone()), (1, m.clone()), (2, m.clone()), (3, m.clone())];
        assert_eq!(most_named(&a, Some(&r)), Some((&m, 3)));
        // The majority names the refuted node: it stays the answer.
        let a = [(0, r.clone()), (1, r.clone()), (2, m.clone())];
        assert_eq!(most_named(&a, Some(&r)), Some((&r, 2)));
        // A tie: the refuted node loses; otherwise the sentinel listed first decides.
        let a = [(0, r.clone()), (1, m.clone())];
        assert_eq!(most_named(&a, Some(&r)), Some((&m, 1)));
        let a = [(2, x.clone()), (1, m.clone())];
        assert_eq!(most_named(&a, None), Some((&m, 1)));
    }

    #[test]
    fn confirmed_sentinels_move_to_the_front_and_wrong_ones_to_the_back() {
        let s: Vec<HostPort> = (0..5).map(|i| hp("s", i)).collect();
        let mut order = s.clone();
        reorder(&mut order, &[2, 3, 4], &[1]);
        assert_eq!(order, vec![s[2].clone(), s[3].clone(), s[4].clone(), s[0].clone(), s[1].clone()]);
        let mut order = s.clone();
        reorder(&mut order, &[1], &[]);
        assert_eq!(order, vec![s[1].clone(), s[0].clone(), s[2].clone(), s[3].clone(), s[4].clone()]);
        let mut order = s.clone();
        reorder(&mut order, &[0], &[]);
        assert_eq!(order, s, "the front sentinel stays in front");
    }

    #[tokio::test]
    async fn unknown_sentinel_master_is_not_found() {
        let port = fake(vec!["*-1\r\n"]).await;
        let err = ask_sentinel(&hp("127.0.0.1", port), "nope", None, None, soon()).await.unwrap_err();
        assert_eq!(err.cause, Cause::NotFound, "{err}");
    }
}
