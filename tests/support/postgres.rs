//! A private PostgreSQL cluster for tests: `initdb` into a temp dir, the
//! server on 127.0.0.1 with an ephemeral port and its Unix socket in that dir,
//! killed on drop. Never touches the machine's shared server.
//!
//! The server refuses to run as root, so when the tests run as root the
//! binaries run as the `postgres` system user (`setpriv`, which execs, so the
//! child's pid is the postmaster's) and the temp dir is handed to that user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{STEP, eventually, eventually_blocking, free_port};

/// The SCRAM-SHA-256 user the checks log in as.
pub const USER: &str = "hg";
/// The md5 user (its password stored as an md5 hash, `md5` in pg_hba.conf).
pub const MD5_USER: &str = "hg_md5";
/// A user allowed in without a password (`trust`).
pub const TRUST_USER: &str = "hg_trust";
/// A user whose password is sent in clear text (`password` in pg_hba.conf).
pub const CLEAR_USER: &str = "hg_clear";
/// A user pg_hba.conf rejects.
pub const REJECTED_USER: &str = "hg_reject";
/// A user pg_hba.conf admits only over TLS.
pub const TLS_USER: &str = "hg_tls";
/// The password of every user.
pub const PASSWORD: &str = "hg-Secret-123";

/// A private PostgreSQL server.
pub struct Postgres {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

/// The directory of the newest installed PostgreSQL's binaries.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).expect("no /usr/lib/postgresql/*/bin/postgres: apt-get install postgresql")
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// The uid and gid of the `postgres` system user.
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line =
        passwd.lines().find(|l| l.starts_with("postgres:")).expect("no postgres user: apt-get install postgresql");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

/// A command for a PostgreSQL binary, run as `postgres` when we are root.
fn pg_command(name: &str) -> Command {
    let bin = bin_dir().join(name);
    if running_as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// Hands `path` to the `postgres` user when we are root.
fn give_to_postgres(path: &Path) {
    if running_as_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
    }
}

/// The postmaster `pid` and its children (the backends call `setsid()`, so
/// they are not in the postmaster's process group).
fn server_processes(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // Fields after the ")" closing the command name: state ppid ...
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Sends `sig` to the postmaster first (so it forks no more), then to its children.
fn signal_server(pid: u32, sig: &str) {
    for p in server_processes(pid) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(p.to_string()).stderr(Stdio::null()).status();
    }
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

impl Postgres {
    /// A fresh cluster with the test users; returns once it accepts connections.
    pub async fn start() -> Postgres {
        Self::start_with(&[]).await
    }

    /// Like [`Postgres::start`] with extra server settings (`-c name=value` pairs as `name=value`).
    pub async fn start_with(settings: &[&str]) -> Postgres {
        let dir = tempfile::Builder::new().prefix("hg-postgres-").tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        give_to_postgres(dir.path());
        let out = pg_command("initdb")
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let hba = format!(
            "local all all trust\nlocal replication all trust\n\
             hostnossl all {TLS_USER} 127.0.0.1/32 reject\n\
             host all {REJECTED_USER} 127.0.0.1/32 reject\n\
             host all {TRUST_USER} 127.0.0.1/32 trust\n\
             host all {CLEAR_USER} 127.0.0.1/32 password\n\
             host all {MD5_USER} 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        std::fs::write(dir.path().join("data/pg_hba.conf"), hba).unwrap();
        let mut pg =
            Postgres { dir, port: free_port(), child: None, extra: settings.iter().map(|s| s.to_string()).collect() };
        pg.spawn().await;
        pg.sql(&format!(
            "CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'; \
             CREATE ROLE {TRUST_USER} LOGIN; \
             CREATE ROLE {CLEAR_USER} LOGIN PASSWORD '{PASSWORD}'; \
             CREATE ROLE {REJECTED_USER} LOGIN PASSWORD '{PASSWORD}'; \
             CREATE ROLE {TLS_USER} LOGIN PASSWORD '{PASSWORD}'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE {MD5_USER} LOGIN PASSWORD '{PASSWORD}'"
        ));
        pg.sql("CREATE DATABASE app");
        pg
    }

    /// A standby streaming from this server (`pg_basebackup -R`), started on its own port.
    pub async fn standby(&self) -> Postgres {
        let dir = tempfile::Builder::new().prefix("hg-postgres-standby-").tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        give_to_postgres(dir.path());
        let out = pg_command("pg_basebackup")
            .arg("-h")
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync", "-D"])
            .arg(dir.path().join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run pg_basebackup");
        assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Postgres { dir, port: free_port(), child: None, extra: self.extra.clone() };
        pg.spawn().await;
        pg
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("server.log")).expect("log file");
        give_to_postgres(&d.join("server.log"));
        let mut cmd = pg_command("postgres");
        cmd.arg("-D").arg(d.join("data")).arg("-p").arg(self.port.to_string()).arg("-k").arg(d).args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "logging_collector=off",
            // The application name in every log line tells the checks' lines from psql's.
            "-c",
            "log_line_prefix=%m [%p] %a: ",
        ]);
        for s in &self.extra {
            cmd.arg("-c").arg(s);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("start postgres");
        self.child = Some(child);
        let this = &*self;
        eventually("postgres accepts connections", Duration::from_secs(30), || async move {
            this.try_sql("SELECT 1").filter(|o| o == "1")
        })
        .await;
    }

    /// The TCP port (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The temp directory (for password files and the like).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The postmaster's pid (also its process group).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("postgres not running").id()
    }

    /// Runs SQL as the superuser over the Unix socket; `None` on failure.
    pub fn try_sql(&self, sql: &str) -> Option<String> {
        self.psql(sql).ok()
    }

    /// Runs SQL as the superuser: its output, or psql's error text.
    fn psql(&self, sql: &str) -> Result<String, String> {
        let out = pg_command("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs SQL as the superuser, failing the test on error.
    pub fn sql(&self, sql: &str) -> String {
        self.psql(sql).unwrap_or_else(|e| panic!("SQL failed: {sql}: {e}"))
    }

    /// Sessions with the given `application_name`.
    pub fn sessions(&self, application_name: &str) -> usize {
        self.sql(&format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application_name}'"))
            .parse()
            .unwrap()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server cleanly (fast shutdown: SIGINT) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::signal(c.id(), "INT");
            let _ = c.wait();
        }
    }

    /// Restarts the server with TLS on (`ssl = on`), serving `cert` and `key`
    /// (copied into its directory: the server wants its key private to it).
    pub async fn enable_tls(&mut self, cert: &Path, key: &Path) {
        let d = self.dir.path().to_path_buf();
        for (src, name) in [(cert, "server.crt"), (key, "server.key")] {
            std::fs::copy(src, d.join(name)).expect("copy TLS file");
            std::fs::set_permissions(d.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
            give_to_postgres(&d.join(name));
        }
        self.extra.push("ssl=on".into());
        self.extra.push(format!("ssl_cert_file={}", d.join("server.crt").display()));
        self.extra.push(format!("ssl_key_file={}", d.join("server.key").display()));
        self.stop();
        self.spawn().await;
    }

    /// Starts the server again after [`Postgres::stop`].
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    /// Freezes every process of the server (SIGSTOP): the kernel still
    /// accepts TCP connections. Returns once all are stopped.
    pub fn freeze(&self) {
        let pid = self.pid();
        signal_server(pid, "STOP");
        eventually_blocking("every postgres process stopped", STEP, || {
            server_processes(pid).iter().all(|p| process_state(*p).is_none_or(|s| s == 'T')).then_some(())
        });
    }

    /// Resumes a frozen server.
    pub fn thaw(&self) {
        signal_server(self.pid(), "CONT");
    }

    /// Opens a session as the trust user over TCP and keeps it (occupies a
    /// connection slot); `None` if the server refused it.
    pub async fn hold_session(&self) -> Option<TcpStream> {
        let mut s = tokio::time::timeout(STEP, TcpStream::connect(self.address())).await.ok()?.ok()?;
        let mut body = Vec::new();
        body.extend_from_slice(&196_608u32.to_be_bytes());
        for kv in ["user", TRUST_USER, "database", "postgres", "application_name", "holder"] {
            body.extend_from_slice(kv.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        s.write_all(&msg).await.ok()?;
        loop {
            let mut head = [0u8; 5];
            tokio::time::timeout(STEP, s.read_exact(&mut head)).await.ok()?.ok()?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
            let mut rest = vec![0u8; len];
            tokio::time::timeout(STEP, s.read_exact(&mut rest)).await.ok()?.ok()?;
            match head[0] {
                b'Z' => return Some(s),
                b'E' => return None,
                _ => {}
            }
        }
    }
}

/// Ends a held session cleanly (`Terminate`).
pub async fn release_session(mut s: TcpStream) {
    let _ = tokio::time::timeout(STEP, s.write_all(b"X\0\0\0\x04")).await;
    let _ = tokio::time::timeout(STEP, s.shutdown()).await;
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Resume first in case the test froze it, then kill every process.
            signal_server(c.id(), "CONT");
            signal_server(c.id(), "KILL");
            let _ = c.wait();
        }
    }
}
