//! Private `redis-server` processes (plain, replica, sentinel) on ephemeral
//! loopback ports, each in its own temp dir, killed on drop.
//!
//! The machine's shared Redis (6379) is never touched.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{STEP, eventually_blocking, free_port, signal};

/// Finds `redis-server` in PATH or the usual system directories.
fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from));
    for d in dirs {
        let candidate = d.join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "redis-server not found in PATH or /usr/sbin, /usr/bin, /usr/local/bin; install it (apt-get install redis-server)"
    );
}

/// One private Redis process: a server, a replica or a sentinel.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Arguments after the binary, reused by [`Redis::restart`].
    args: Vec<String>,
    frozen: bool,
}

impl Redis {
    /// Starts a server with extra config directives (`["--requirepass", "pw"]`).
    pub fn start(extra: &[&str]) -> Redis {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.path().to_str().unwrap(),
            "--logfile",
            "redis.log",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Redis::spawn(dir, port, args)
    }

    /// Starts a replica of `master`, waiting until its replication link is up.
    pub fn replica_of(master: &Redis, extra: &[&str]) -> Redis {
        let mport = master.port.to_string();
        let mut all = vec!["--replicaof", "127.0.0.1", mport.as_str()];
        all.extend_from_slice(extra);
        let replica = Redis::start(&all);
        eventually_blocking("replica link up", STEP, || {
            replica.info("replication").contains("master_link_status:up").then_some(())
        });
        replica
    }

    /// Starts a sentinel monitoring `master` as `name` with tight timings
    /// (down after 1 s), waiting until it has discovered `replicas` replicas.
    /// With `password`, the sentinel itself requires it (`requirepass`).
    pub fn sentinel(master: &Redis, name: &str, replicas: usize, password: Option<&str>) -> Redis {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let mut text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\nlogfile sentinel.log\n\
             sentinel monitor {name} 127.0.0.1 {mport} 1\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 5000\n\
             sentinel parallel-syncs {name} 1\n",
            dir = dir.path().display(),
            mport = master.port,
        );
        let mut ask = String::new();
        if let Some(pw) = password {
            text.push_str(&format!("requirepass {pw}\n"));
            ask.push_str(&format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{pw}\r\n", pw.len()));
        }
        std::fs::write(&conf, text).expect("write sentinel.conf");
        let args = vec![conf.to_str().unwrap().to_string(), "--sentinel".to_string()];
        let sentinel = Redis::spawn(dir, port, args);
        ask.push_str(&format!("*3\r\n$8\r\nSENTINEL\r\n$8\r\nreplicas\r\n${}\r\n{name}\r\n", name.len()));
        let want = format!("*{replicas}\r\n");
        eventually_blocking("sentinel knows the replicas", Duration::from_secs(20), || {
            sentinel.raw(ask.as_bytes()).contains(&want).then_some(())
        });
        sentinel
    }

    fn spawn(dir: tempfile::TempDir, port: u16, args: Vec<String>) -> Redis {
        let mut r = Redis { child: None, port, dir, args, frozen: false };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new(binary())
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        self.frozen = false;
        let port = self.port;
        let dir = self.dir.path().to_path_buf();
        let pid = self.pid();
        eventually_blocking(&format!("redis-server (pid {pid}) answering on port {port}"), STEP, || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("redis-server exited with {status}; log:\n{}", log_tail(&dir));
            }
            // Any reply counts as up: -NOAUTH and -LOADING included.
            let r = raw(port, b"*1\r\n$4\r\nPING\r\n");
            (r.starts_with('+') || r.starts_with('-')).then_some(())
        });
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The temp dir (config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs the process and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.frozen = false;
    }

    /// Starts the process again with the same arguments and port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// SIGSTOPs the process: connections are accepted by the kernel but never answered.
    pub fn freeze(&mut self) {
        signal(self.pid(), "STOP");
        self.frozen = true;
    }

    /// SIGCONTs a frozen process.
    pub fn thaw(&mut self) {
        signal(self.pid(), "CONT");
        self.frozen = false;
    }

    /// Sends raw RESP bytes on a fresh connection and returns what comes back
    /// within a short time (empty on failure); for setup and assertions.
    pub fn raw(&self, request: &[u8]) -> String {
        raw(self.port, request)
    }

    /// Sends one command (words joined by spaces in RESP) and returns the raw reply.
    pub fn command(&self, words: &[&str]) -> String {
        let mut req = format!("*{}\r\n", words.len());
        for w in words {
            req.push_str(&format!("${}\r\n{w}\r\n", w.len()));
        }
        self.raw(req.as_bytes())
    }

    /// `INFO <section>` (only for servers without a password).
    pub fn info(&self, section: &str) -> String {
        self.command(&["INFO", section])
    }

    /// The server's log so far (last lines), for failure messages.
    pub fn log(&self) -> String {
        log_tail(self.dir.path())
    }
}

/// Sends raw bytes to `127.0.0.1:port`; returns the reply read until it
/// stops growing (the helpers only need small replies), empty on failure.
fn raw(port: u16, request: &[u8]) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(request).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn log_tail(dir: &Path) -> String {
    let mut out = String::new();
    for f in ["redis.log", "sentinel.log"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
        }
    }
    out
}

impl Drop for Redis {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process.
        self.kill();
    }
}
