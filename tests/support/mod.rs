//! Test support shared by the integration tests: private servers on
//! ephemeral ports, a fault-injecting relay, and a healthgate launcher.
//!
//! Every test binary includes this with `mod support;` and uses only parts
//! of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod app;
pub mod healthgate;
pub mod mariadb;
pub mod pki;
pub mod postgres;
pub mod rabbitmq;
pub mod redis;
pub mod relay;

use std::future::Future;
use std::time::Duration;

/// Reads once from a blocking socket into `buf`, waiting at most `wait`
/// (at least 1 ms). False when nothing came: a timeout, or the end of the
/// stream (then `eof` is set; a read error counts as the end).
pub fn read_some(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>, eof: &mut bool, wait: Duration) -> bool {
    use std::io::{ErrorKind, Read};
    if *eof {
        return false;
    }
    stream.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).unwrap();
    let mut chunk = [0u8; 65536];
    match stream.read(&mut chunk) {
        Ok(0) => {
            *eof = true;
            false
        }
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(_) => {
            *eof = true;
            false
        }
    }
}

/// Bound on any single await in a test, so a hang fails fast.
pub const STEP: Duration = Duration::from_secs(10);

/// Polls `f` every 50 ms until it returns `Some`, failing the test after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(Some(v)) = tokio::time::timeout(within, f()).await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Blocking variant of [`eventually`] for code outside a runtime.
pub fn eventually_blocking<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP dependency the test can take down (connections refused) and bring
/// back on the same port. The listener never accepts: a `tcp` check needs
/// only the kernel to complete the handshake.
pub struct Dep {
    /// Its address.
    pub addr: std::net::SocketAddr,
    listener: Option<std::net::TcpListener>,
}

impl Dep {
    /// Listens on 127.0.0.1:0.
    pub fn up() -> Dep {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Dep { addr: l.local_addr().unwrap(), listener: Some(l) }
    }

    /// Closes the listener: connects are refused.
    pub fn kill(&mut self) {
        self.listener = None;
    }

    /// Listens again on the same port.
    pub fn revive(&mut self) {
        self.listener = Some(std::net::TcpListener::bind(self.addr).unwrap());
    }
}

/// A dependency that is always up: a listener on 127.0.0.1 that accepts and
/// closes every connection, forever (accepting matters: unaccepted
/// connections would fill the backlog and connects would time out).
pub fn always_up() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    addr
}

/// A TCP port that was free a moment ago (for servers that cannot bind port 0
/// and report it back, such as mariadbd or rabbitmq).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends SIGSTOP / SIGCONT / SIGKILL / SIGTERM to a process. A SIGSTOP
/// returns only once every thread of the process has stopped: `kill` returns
/// when the signal is queued, and a thread that was running on another core
/// may still answer a request sent in that instant.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
    if sig == "STOP" {
        eventually_blocking("every thread stopped after SIGSTOP", Duration::from_secs(5), || {
            all_threads_stopped(pid).then_some(())
        });
    }
}

/// Whether every thread of `pid` is in the stopped state (`T`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|task| {
        // The state follows the parenthesised command name, which may hold spaces.
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

/// One `GET path` on a keep-alive connection: (status, lower-cased
/// headers, body by `Content-Length`), or what went wrong.
pub async fn exchange(
    conn: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    path: &str,
) -> Result<(u16, Vec<(String, String)>, Vec<u8>), String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    conn.get_mut().write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    match conn.read_line(&mut line).await {
        Ok(0) => return Err("connection closed before a response".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("read status line: {e}")),
    }
    let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or(format!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        match conn.read_line(&mut h).await {
            Ok(0) => return Err("truncated head".into()),
            Ok(_) if h == "\r\n" => break,
            Ok(_) => {
                let (k, v) = h.split_once(':').ok_or(format!("bad header {h:?}"))?;
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
            Err(e) => return Err(format!("read head: {e}")),
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or(format!("{status} without content-length: {headers:?}"))?;
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await.map_err(|e| format!("truncated body ({status}, {len} bytes): {e}"))?;
    Ok((status, headers, body))
}
