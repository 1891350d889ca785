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

use self::resp::{MAX_REPLY, Reply, RespError, encode, parse, truncate};
use super::io::exchange;
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
    buf: Vec<u8>,
    peer: SocketAddr,
}

impl Conn {
    async fn open(target: &HostPort, tls: Option<&TlsSettings>, deadline: Instant) -> Result<Conn, CheckError> {
        let (stream, peer) = tls::connect(target, tls, deadline).await?;
        Ok(Conn { stream, buf: Vec::with_capacity(4096), peer })
    }

    /// Sends one command and reads its reply, by `deadline`.
    async fn call(&mut self, args: &[&[u8]], deadline: Instant, what: &str) -> Result<Reply, CheckError> {
        exchange(deadline, what, self.stream.write_all(&encode(args))).await?;
        self.read_reply(deadline, what).await
    }

    async fn read_reply(&mut self, deadline: Instant, what: &str) -> Result<Reply, CheckError> {
        loop {
            match parse(&self.buf) {
                Ok((reply, used)) => {
                    // The whole reply is consumed at once.
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Err(RespError::Incomplete) if self.buf.len() > MAX_REPLY => {
                    return Err(CheckError::new(Cause::Protocol, format!("{what}: reply larger than 1 MiB")));
                }
                Err(RespError::Incomplete) => {}
                Err(e) => return Err(CheckError::new(Cause::Protocol, format!("{what}: {e}"))),
            }
            self.buf.reserve(4096);
            let n = exchange(deadline, what, self.stream.read_buf(&mut self.buf)).await?;
            if n == 0 {
                return Err(CheckError::new(Cause::Reset, format!("{what}: connection closed by {}", self.peer)));
            }
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
    /// Sentinels in the order to ask them; the last one that answered first.
    sentinels: Vec<HostPort>,
    conn: Option<Conn>,
    version: Option<String>,
    current_master: Option<HostPort>,
}

impl RedisCheck {
    /// Builds the check.
    pub fn new(settings: RedisSettings, dep: &DependencyConfig) -> Self {
        let sentinels = match &settings.target {
            Target::Sentinel(s) => s.addresses.clone(),
            Target::Direct(_) => Vec::new(),
        };
        RedisCheck { settings, name: dep.name.clone(), sentinels, conn: None, version: None, current_master: None }
    }

    fn uses_sentinel(&self) -> bool {
        matches!(self.settings.target, Target::Sentinel(_))
    }

    /// Connects to `target`, authenticates, selects the database and reads
    /// the server version.
    async fn connect(&mut self, target: &HostPort, deadline: Instant) -> Result<Conn, CheckError> {
        let password = read_secret(&self.settings.password)?;
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
                    self.version = Some(v.trim().to_string());
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

    /// Asks the sentinels in turn for the current master's address.
    ///
    /// Each sentinel gets an equal share of the time, with one share kept
    /// back for connecting to the master it names.
    async fn discover(&mut self, deadline: Instant) -> Result<HostPort, CheckError> {
        let Target::Sentinel(s) = &self.settings.target else { unreachable!("discover without sentinel") };
        let n = self.sentinels.len();
        let phase_end = Instant::now() + remaining(deadline) * n as u32 / (n as u32 + 1);
        let password = read_secret(&s.password)?;
        let mut failures: Vec<(String, CheckError)> = Vec::new();
        for i in 0..n {
            let share_end = Instant::now() + remaining(phase_end) / (n - i) as u32;
            let sentinel = self.sentinels[i].clone();
            let pw = password.as_ref().map(Secret::expose);
            match ask_sentinel(&sentinel, &s.master_name, pw, self.settings.tls.as_ref(), share_end).await {
                Ok(master) => {
                    // The sentinel client guidelines: ask the one that answered first next time.
                    let answered = self.sentinels.remove(i);
                    self.sentinels.insert(0, answered);
                    return Ok(master);
                }
                Err(e) => {
                    debug!(dependency = %self.name, sentinel = %sentinel, error = %e, "sentinel did not answer");
                    failures.push((sentinel.to_string(), e));
                }
            }
        }
        // A sentinel that answered but could not help (unknown master name,
        // rejected password, nonsense) says more than one that is down.
        let cause = most_telling(failures.iter().map(|(_, e)| e)).map_or(Cause::Config, |i| failures[i].1.cause);
        let list = failures.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; ");
        Err(CheckError::new(cause, format!("no sentinel named the master {:?}: {list}", s.master_name)))
    }

    /// Connects to the node to check (asking the sentinels first) and probes it.
    async fn fresh(&mut self, deadline: Instant) -> Result<(), CheckError> {
        let target = match &self.settings.target {
            Target::Direct(hp) => hp.clone(),
            Target::Sentinel(_) => {
                let master = self.discover(deadline).await?;
                if self.current_master.as_ref() != Some(&master) {
                    if let Some(old) = &self.current_master {
                        info!(dependency = %self.name, from = %old, to = %master, "sentinel names a new redis master");
                    }
                    self.current_master = Some(master.clone());
                }
                master
            }
        };
        let mut conn = match self.connect(&target, deadline).await {
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

    /// Whether a failure on a reused connection deserves a fresh attempt
    /// within the same check before judging.
    fn retry_fresh(&self, cause: Cause) -> bool {
        match cause {
            // The server closed an idle connection (`timeout`), restarted, or failed over.
            Cause::Reset => true,
            // The sentinels may already name a new master.
            Cause::NotMaster | Cause::MasterDown => self.uses_sentinel(),
            _ => false,
        }
    }
}

/// Asks one sentinel for the address of `master_name`, by `deadline`.
async fn ask_sentinel(
    sentinel: &HostPort,
    master_name: &str,
    password: Option<&str>,
    tls: Option<&TlsSettings>,
    deadline: Instant,
) -> Result<HostPort, CheckError> {
    let mut conn = Conn::open(sentinel, tls, deadline).await?;
    if let Some(pw) = password {
        conn.auth(None, pw, deadline, "sentinel AUTH").await?;
    }
    let what = "SENTINEL get-master-addr-by-name";
    let reply = conn.call(&[b"SENTINEL", b"get-master-addr-by-name", master_name.as_bytes()], deadline, what).await?;
    // Sentinels do not log client disconnects; a FIN is enough.
    let _ = timeout_at(deadline, conn.stream.shutdown()).await;
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

impl Check for RedisCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        // The connection is taken out for the duration of the probe: if the
        // monitor cancels this future mid-exchange, the half-read connection
        // is dropped with it and the next check starts clean.
        if let Some(mut conn) = self.conn.take() {
            match self.probe(&mut conn, deadline).await {
                Ok(()) => {
                    self.conn = Some(conn);
                    return Ok(());
                }
                Err(e) if self.retry_fresh(e.cause) && !remaining(deadline).is_zero() => {
                    debug!(dependency = %self.name, error = %e, "redis connection lost; reconnecting once");
                }
                Err(e) => {
                    if self.keeps_connection(e.cause) {
                        self.conn = Some(conn);
                    }
                    return Err(e);
                }
            }
        }
        self.fresh(deadline).await
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
        RedisCheck { settings: s, name: "t".into(), sentinels: vec![], conn: None, version: None, current_master: None }
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

    #[tokio::test]
    async fn unknown_sentinel_master_is_not_found() {
        let port = fake(vec!["*-1\r\n"]).await;
        let err = ask_sentinel(&hp("127.0.0.1", port), "nope", None, None, soon()).await.unwrap_err();
        assert_eq!(err.cause, Cause::NotFound, "{err}");
    }
}
