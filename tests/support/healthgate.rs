//! Runs the real `healthgate` binary as a child process on ephemeral ports.
//!
//! The config uses port 0 for every listener and the admin server; the
//! launcher reads the bound addresses from the JSON "healthgate started"
//! event on stderr, so no port is ever guessed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Path of the binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_healthgate"))
}

/// A running healthgate process; killed on drop.
pub struct Healthgate {
    child: Child,
    /// Bound address of each listener, in config order.
    pub listeners: Vec<SocketAddr>,
    /// Bound admin address.
    pub admin: SocketAddr,
    /// Every log line so far (JSON).
    pub logs: Arc<Mutex<Vec<String>>>,
    /// The config file it runs with (a test rewrites it to reload).
    pub config: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Healthgate {
    /// Starts healthgate with `config` (YAML). Listener and admin addresses
    /// in it should use port 0.
    pub fn start(config: &str) -> Healthgate {
        Self::start_with_env(config, &[])
    }

    /// Like [`Healthgate::start`] with extra environment variables.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Healthgate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let mut hg = Self::start_at(&path, env);
        hg._dir = Some(dir);
        hg
    }

    /// Starts healthgate with the config file at `path` (which the caller keeps).
    pub fn start_at(path: &std::path::Path, env: &[(&str, &str)]) -> Healthgate {
        let mut cmd = Command::new(binary());
        cmd.args(["--log-format", "json", "run", "--config"]).arg(path);
        cmd.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn healthgate");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("healthgate started") {
                        let _ = tx.send(line.clone());
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let started = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("healthgate did not start; logs:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        let event: serde_json::Value = serde_json::from_str(&started).expect("JSON log line");
        let admin = event["admin"].as_str().unwrap().parse().unwrap();
        let listeners = event["listeners"]
            .as_str()
            .unwrap()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        Healthgate { child, listeners, admin, logs, config: path.to_path_buf(), _dir: None }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. "TERM", "INT").
    pub fn signal(&self, sig: &str) {
        super::signal(self.pid(), sig);
    }

    /// Waits for the process to exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        super::eventually_blocking("healthgate to exit", within, || self.child.try_wait().unwrap())
    }

    /// Log lines (parsed) whose message contains `needle`.
    pub fn events(&self, needle: &str) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// GETs an admin path; returns (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/status").1).unwrap()
    }

    /// The service state from `/status`.
    pub fn state(&self) -> String {
        self.status()["service"]["state"].as_str().unwrap().to_string()
    }

    /// Polls until the service state is `state`.
    pub fn wait_state(&self, state: &str, within: Duration) {
        super::eventually_blocking(&format!("service state {state}"), within, || (self.state() == state).then_some(()));
    }
}

impl Drop for Healthgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP/1.1 GET with `Connection: close`; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) =
        http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"));
    (status, body)
}

/// Sends a raw request and reads the response until EOF; returns (status, head, body).
pub fn http_request(addr: SocketAddr, raw: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, super::STEP).expect("connect");
    s.set_read_timeout(Some(super::STEP)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}
