//! A private MariaDB server for tests: a fresh data directory in a temp dir,
//! `mariadbd` on 127.0.0.1 with an ephemeral port, killed on drop. Never
//! touches the machine's shared server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use tempfile::TempDir;

use super::{STEP, eventually, free_port, signal};

/// The user the checks authenticate as.
pub const USER: &str = "hg";
/// Its password.
pub const PASSWORD: &str = "hg-Secret-123";

/// A private `mariadbd`.
pub struct MariaDb {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// Extra server options, kept for restarts.
    extra: Vec<String>,
}

/// Finds a server binary in PATH or /usr/sbin, or panics with a clear message.
fn binary(names: &[&str]) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/local/sbin".into()]).collect::<Vec<_>>();
    for name in names {
        for d in &dirs {
            let p = d.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("none of {names:?} found in PATH or /usr/sbin: install mariadb-server (apt-get install mariadb-server)")
}

impl MariaDb {
    /// Installs a data directory and starts the server; returns once it
    /// accepts connections and the test user exists.
    pub async fn start() -> MariaDb {
        Self::start_with(&[]).await
    }

    /// Like [`MariaDb::start`] with extra `mariadbd` options (e.g. `--ssl-cert=...`).
    pub async fn start_with(extra: &[String]) -> MariaDb {
        let dir = tempfile::Builder::new().prefix("hg-mariadb-").tempdir().expect("temp dir");
        let install = binary(&["mariadb-install-db", "mysql_install_db"]);
        // A private tmpdir: concurrent bootstraps sharing /tmp collide on
        // their temporary table names.
        std::fs::create_dir(dir.path().join("tmp")).expect("tmp dir");
        let out = Command::new(&install)
            .arg("--no-defaults")
            .arg("--auth-root-authentication-method=normal")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--tmpdir={}", dir.path().join("tmp").display()))
            .arg("--skip-test-db")
            .arg("--skip-name-resolve")
            .args(user_arg())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = MariaDb { dir, port: free_port(), child: None, extra: extra.to_vec() };
        db.spawn().await;
        db.exec(&format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; \
             GRANT PROCESS ON *.* TO '{USER}'@'%'; \
             CREATE DATABASE app; GRANT SELECT ON app.* TO '{USER}'@'%'"
        ))
        .await;
        db
    }

    /// Starts `mariadbd` on the data directory and port, waiting until it answers.
    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let child = Command::new(binary(&["mariadbd", "mysqld"]))
            .arg("--no-defaults")
            .args(user_arg())
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--pid-file={}", d.join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg("--skip-name-resolve")
            .arg("--innodb-buffer-pool-size=16M")
            .arg("--max-connect-errors=1000000")
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        let port = self.port;
        eventually("mariadbd accepts TCP connections", Duration::from_secs(30), || async move {
            // A bare TCP connect would count as an aborted connect; log in instead.
            let opts = OptsBuilder::default()
                .ip_or_hostname("127.0.0.1")
                .tcp_port(port)
                .user(Some("root"))
                .prefer_socket(false);
            let conn = tokio::time::timeout(STEP, Conn::new(opts)).await.ok()?.ok()?;
            conn.disconnect().await.ok()
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

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mariadbd not running").id()
    }

    /// The temp directory (for password files and the like).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("mariadbd.sock")
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server cleanly (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data directory and port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Starts the server again after [`MariaDb::kill`] or [`MariaDb::stop`].
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    /// Freezes the server (SIGSTOP): the kernel still accepts TCP connections.
    /// Returns once every thread of the server is stopped, so no reply can
    /// slip out after this call.
    pub fn freeze(&self) {
        let pid = self.pid();
        signal(pid, "STOP");
        super::eventually_blocking("every mariadbd thread stopped", STEP, || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            let all_stopped = tasks.flatten().all(|t| {
                // The state is the field after the ")" closing the command name.
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('T')))
                    .unwrap_or(true)
            });
            all_stopped.then_some(())
        });
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// An admin (root) connection over the Unix socket. Close it with
    /// `disconnect()` so it does not count as an aborted client.
    pub async fn admin(&self) -> Conn {
        let opts = OptsBuilder::default().socket(Some(self.socket().to_string_lossy().to_string())).user(Some("root"));
        tokio::time::timeout(STEP, Conn::new(opts)).await.expect("admin connect timed out").expect("admin connect")
    }

    /// Runs statements as root.
    pub async fn exec(&self, sql: &str) {
        let mut c = self.admin().await;
        tokio::time::timeout(STEP, c.query_drop(sql)).await.expect("admin query timed out").expect(sql);
        c.disconnect().await.expect("admin disconnect");
    }

    /// `SET GLOBAL var = value` (value as SQL, e.g. `1` or `'ON'`).
    pub async fn set_global(&self, var: &str, value: &str) {
        self.exec(&format!("SET GLOBAL {var} = {value}")).await;
    }

    /// A global status counter (`SHOW GLOBAL STATUS LIKE var`).
    pub async fn status(&self, var: &str) -> u64 {
        let mut c = self.admin().await;
        let row: Option<(String, String)> =
            tokio::time::timeout(STEP, c.query_first(format!("SHOW GLOBAL STATUS LIKE '{var}'")))
                .await
                .expect("status query timed out")
                .expect("status query");
        c.disconnect().await.expect("admin disconnect");
        let (_, v) = row.unwrap_or_else(|| panic!("no status variable {var}"));
        v.parse().unwrap_or_else(|_| panic!("status {var} = {v:?} is not a number"))
    }

    /// Kills (server side, `KILL CONNECTION`) every connection of `user`;
    /// returns how many there were.
    pub async fn kill_connections_of(&self, user: &str) -> usize {
        let mut c = self.admin().await;
        let ids: Vec<u64> = tokio::time::timeout(
            STEP,
            c.query(format!("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{user}'")),
        )
        .await
        .expect("processlist timed out")
        .expect("processlist");
        for id in &ids {
            tokio::time::timeout(STEP, c.query_drop(format!("KILL CONNECTION {id}")))
                .await
                .expect("kill timed out")
                .expect("kill");
        }
        c.disconnect().await.expect("admin disconnect");
        ids.len()
    }

    /// `(Aborted_connects, Aborted_clients)`.
    pub async fn aborted(&self) -> (u64, u64) {
        (self.status("Aborted_connects").await, self.status("Aborted_clients").await)
    }

    /// Number of client connections currently open (admin connection excluded).
    pub async fn connections(&self) -> u64 {
        self.status("Threads_connected").await.saturating_sub(1)
    }
}

/// `--user=root` when running as root (mariadbd refuses root otherwise).
fn user_arg() -> Vec<String> {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match uid.as_deref() {
        Ok("0") => vec!["--user=root".to_string()],
        _ => Vec::new(),
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process still dies on SIGKILL.
            let _ = Command::new("kill").arg("-KILL").arg(c.id().to_string()).status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}
