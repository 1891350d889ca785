//! The SIGTERM drain of the real binary, driven with real signals: readiness
//! fails at once, the listeners keep serving for `drain.delay`, then refuse
//! new connections while in-flight work (a slow answer, a long streaming
//! response, an open TCP session) finishes within `drain.timeout`; the
//! process exits 0. A drain that outlives its timeout is cut, and a second
//! signal ends the process at once with 130.
//!
//! The upstream is a small blocking HTTP/1.1 server in this file, because
//! the test needs per-request behaviour (sleep N ms, stream N chunks, hang)
//! and to know when a request has reached it.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::healthgate::Healthgate;
use support::{STEP, eventually_blocking};

/// Bound for anything that should happen "soon" on a loaded 2-core machine.
const WITHIN: Duration = Duration::from_secs(10);

/// The upstream app. `GET /sleep/MS` answers `slept MS` after MS
/// milliseconds; `GET /stream/N` streams N chunks (`chunk I\n`) 100 ms apart;
/// `GET /upgrade` switches to an echo protocol (`101`); anything else answers
/// `ok PATH` at once. Keep-alive, as healthgate pools.
struct Upstream {
    addr: SocketAddr,
    /// Requests whose head has arrived.
    started: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        std::thread::spawn(move || {
            for stream in l.incoming().map_while(Result::ok) {
                let s = s.clone();
                std::thread::spawn(move || Self::serve(stream, &s));
            }
        });
        Upstream { addr, started }
    }

    fn serve(stream: TcpStream, started: &AtomicUsize) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut out = stream;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split(' ').nth(1).unwrap_or("/").to_string();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                if h == "\r\n" {
                    break;
                }
            }
            started.fetch_add(1, Ordering::SeqCst);
            if path == "/upgrade" {
                // Switches to an echo protocol for the rest of the connection.
                if out
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
                    .is_ok()
                {
                    let _ = std::io::copy(&mut reader, &mut out);
                }
                return;
            }
            let r = if let Some(ms) = path.strip_prefix("/sleep/") {
                let ms: u64 = ms.parse().unwrap();
                std::thread::sleep(Duration::from_millis(ms));
                let body = format!("slept {ms}");
                write!(out, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
            } else if let Some(n) = path.strip_prefix("/stream/") {
                let n: usize = n.parse().unwrap();
                (|| {
                    out.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")?;
                    for i in 0..n {
                        let chunk = format!("chunk {i}\n");
                        write!(out, "{:x}\r\n{chunk}\r\n", chunk.len())?;
                        out.flush()?;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    out.write_all(b"0\r\n\r\n")
                })()
            } else {
                let body = format!("ok {path}");
                write!(out, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
            };
            if r.is_err() {
                return;
            }
        }
    }

    /// Waits until `n` requests have reached the app.
    fn wait_started(&self, n: usize) {
        eventually_blocking(&format!("{n} requests at the app"), WITHIN, || {
            (self.started.load(Ordering::SeqCst) >= n).then_some(())
        });
    }
}

/// Starts healthgate with one HTTP listener to `app` and a TCP listener to
/// `tcp_upstream`, one always-up dependency, and the given drain settings.
fn start(app: SocketAddr, tcp_upstream: SocketAddr, delay: &str, timeout: &str) -> Healthgate {
    let dep = support::always_up();
    let cfg = format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\ndrain:\n  delay: {delay}\n  timeout: {timeout}\n\
         listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{app}\"\n\
         \x20 - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: \"{tcp_upstream}\"\n\
         dependencies:\n  - name: db\n    type: tcp\n    address: \"{}\"\n    interval: 100ms\n    timeout: 1s\n    rise: 1\n    fall: 2\n",
        dep
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    hg
}

/// A complete response read on a `Connection: close` request: (status, raw head, raw body).
fn get(addr: SocketAddr, path: &str, read_timeout: Duration) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, STEP)?;
    s.set_read_timeout(Some(read_timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, head, buf[split..].to_vec()))
}

/// Decodes a chunked body; `None` if it is truncated or malformed.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).ok()?.trim(), 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return (raw == b"\r\n").then_some(out);
        }
        if raw.len() < size + 2 || &raw[size..size + 2] != b"\r\n" {
            return None;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn in_background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(f)
}

fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, STEP), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// An echo server for the TCP listener.
fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    addr
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn new_requests_are_served_during_the_delay_and_refused_after_it() {
    let app = Upstream::start();
    let delay = Duration::from_secs(3);
    let mut hg = start(app.addr, echo(), "3s", "10s");
    let web = hg.listeners[0];
    let signalled = Instant::now();
    hg.signal("TERM");
    eventually_blocking("readiness 503", WITHIN, || (hg.admin_get("/readyz").0 == 503).then_some(()));
    // Kubernetes still routes to the pod until it sees the failed probe: a
    // fresh connection during the delay gets the app's answer.
    let (status, _, body) = get(web, "/during-delay", STEP).unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"ok /during-delay"[..]));
    assert!(signalled.elapsed() < delay, "the request above must run inside the delay; raise the delay");
    eventually_blocking("new connections refused", WITHIN + delay, || refused(web).then_some(()));
    // Not before the delay (a 50 ms allowance for clock granularity).
    assert!(
        signalled.elapsed() + Duration::from_millis(50) >= delay,
        "stopped accepting after {:?}",
        signalled.elapsed()
    );
    assert_eq!(hg.wait_exit(WITHIN).code(), Some(0));
}

#[test]
fn a_slow_request_and_a_long_stream_in_flight_finish_then_the_process_exits_zero() {
    let app = Upstream::start();
    let mut hg = start(app.addr, echo(), "500ms", "20s");
    let web = hg.listeners[0];
    let slow = in_background(move || get(web, "/sleep/3000", Duration::from_secs(30)));
    // 30 chunks, 100 ms apart: ~3 s of streaming, well past the delay.
    let stream = in_background(move || get(web, "/stream/30", Duration::from_secs(30)));
    app.wait_started(2);
    hg.signal("TERM");

    let (status, _, body) = slow.join().unwrap().expect("the slow request completes");
    assert_eq!((status, body.as_slice()), (200, &b"slept 3000"[..]));
    let (status, head, raw) = stream.join().unwrap().expect("the stream completes");
    assert_eq!(status, 200, "{head}");
    let body = String::from_utf8(dechunk(&raw).expect("a complete chunked body")).unwrap();
    let want: String = (0..30).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(body, want);
    assert_eq!(hg.wait_exit(WITHIN).code(), Some(0));
}

#[test]
fn a_stuck_request_is_cut_at_the_drain_timeout_and_the_process_exits() {
    let app = Upstream::start();
    let mut hg = start(app.addr, echo(), "200ms", "1s");
    let web = hg.listeners[0];
    let stuck = in_background(move || get(web, "/sleep/60000", Duration::from_secs(30)));
    app.wait_started(1);
    let signalled = Instant::now();
    hg.signal("TERM");
    // delay + timeout + the drain's 500 ms grace = 1.7 s; WITHIN is the slack.
    let status = hg.wait_exit(WITHIN);
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() >= Duration::from_millis(1200), "exited before delay + timeout");
    // The client is not left hanging: its connection ends without an answer.
    match stuck.join().unwrap() {
        Ok((status, head, _)) => assert_eq!(status, 0, "no response expected, got {head}"),
        Err(e) => assert_ne!(e.kind(), ErrorKind::WouldBlock, "the client was left hanging"),
    }
}

/// A second signal while in-flight work is being waited for ends the process
/// at once with 130.
fn second_signal_during_the_wait_exits_at_once(second: &str) {
    let app = Upstream::start();
    let mut hg = start(app.addr, echo(), "200ms", "60s");
    let web = hg.listeners[0];
    let _stuck = in_background(move || get(web, "/sleep/60000", Duration::from_secs(90)));
    app.wait_started(1);
    hg.signal("TERM");
    // Refusing connections means the delay is over and the wait has begun.
    eventually_blocking("new connections refused", WITHIN, || refused(web).then_some(()));
    let signalled = Instant::now();
    hg.signal(second);
    let status = hg.wait_exit(WITHIN);
    assert_eq!(status.code(), Some(130), "exit after the second signal: {status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5), "took {:?} after the second signal", signalled.elapsed());
}

#[test]
fn a_second_sigterm_while_requests_are_in_flight_exits_at_once_with_130() {
    second_signal_during_the_wait_exits_at_once("TERM");
}

#[test]
fn a_sigint_while_requests_are_in_flight_exits_at_once_with_130() {
    second_signal_during_the_wait_exits_at_once("INT");
}

#[test]
fn an_open_tcp_session_keeps_working_during_the_drain_and_its_close_ends_the_process() {
    let app = Upstream::start();
    let mut hg = start(app.addr, echo(), "200ms", "60s");
    let l4 = hg.listeners[1];
    let mut s = TcpStream::connect_timeout(&l4, STEP).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    round_trip(&mut s, b"before");
    hg.signal("TERM");
    eventually_blocking("new tcp connections refused", WITHIN, || refused(l4).then_some(()));
    round_trip(&mut s, b"during the drain");
    let closed = Instant::now();
    drop(s);
    // The 60 s timeout is not waited for: the last session's end ends the drain.
    assert_eq!(hg.wait_exit(WITHIN).code(), Some(0));
    assert!(closed.elapsed() < WITHIN);
}

// === keep-alive clients across the drain ===

/// One response on a kept-alive connection: (status, `Connection: close`?, body).
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, bool, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()))
    };
    let close = header("connection").is_some_and(|v| v.contains("close"));
    let mut body = vec![0u8; header("content-length").and_then(|n| n.parse().ok()).unwrap_or(0)];
    s.read_exact(&mut body)?;
    Ok((status, close, body))
}

/// Whether the peer closed a kept-alive connection while it was idle, as a
/// client's connection pool checks before reusing one.
fn closed_while_idle(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let r = s.peek(&mut [0u8; 1]);
    s.set_nonblocking(false).unwrap();
    match r {
        Ok(0) => true,
        Ok(_) => panic!("bytes nobody asked for on an idle connection"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// What the keep-alive clients saw.
#[derive(Default)]
struct Tally {
    written: AtomicUsize,
    answered: AtomicUsize,
    /// Requests written on an open connection that got no response.
    lost: AtomicUsize,
    /// Connections closed right after a response carrying `Connection: close`.
    closed_by_response: AtomicUsize,
    /// Connections found closed while idle, before a request was written.
    closed_while_idle: AtomicUsize,
    /// `Connection: close` responses before the drain began.
    closed_before_sigterm: AtomicUsize,
}

/// 64 keep-alive clients keep sending requests across SIGTERM: fast ones
/// (0-10 ms between requests), slower ones whose idle connections are parked
/// between requests (100-300 ms), and sleepers that leave their connection
/// unused for the whole `drain.delay` and check it before reuse (the
/// others write without looking). Kubernetes' endpoint removal is
/// simulated: once readiness failed (plus a margin) clients open no new
/// connection to this pod, but keep using the ones they have. No request
/// written on an open connection may go unanswered: every connection must
/// end with a `Connection: close` response or be found closed while idle.
#[test]
fn keep_alive_clients_lose_no_request_across_sigterm() {
    const CLIENTS: usize = 64;
    let delay = Duration::from_millis(1500);
    let app = Upstream::start();
    let mut hg = start(app.addr, echo(), "1500ms", "5s");
    let web = hg.listeners[0];
    let tally = Arc::new(Tally::default());
    let sigterm: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let removed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (tally, sigterm, removed) = (tally.clone(), sigterm.clone(), removed.clone());
            in_background(move || {
                let sleeper = i % 8 == 0;
                let think = |n: usize| match i % 8 {
                    1..=3 => Duration::from_millis(100 + ((i * 37 + n * 11) % 200) as u64),
                    _ => Duration::from_millis(((i * 7 + n * 3) % 10) as u64),
                };
                let mut conn: Option<TcpStream> = None;
                let mut used = false;
                for n in 0.. {
                    if conn.is_none() {
                        if removed.load(Ordering::SeqCst) {
                            return;
                        }
                        let s = TcpStream::connect_timeout(&web, STEP).expect("connect during the delay");
                        s.set_read_timeout(Some(WITHIN)).unwrap();
                        (conn, used) = (Some(s), false);
                    }
                    let s = conn.as_mut().unwrap();
                    // Only a sleeper looks before reusing its connection (as
                    // a pool does for one idle that long); the others write
                    // at once, so a close under them would lose a request.
                    if sleeper && used && closed_while_idle(s) {
                        tally.closed_while_idle.fetch_add(1, Ordering::SeqCst);
                        conn = None;
                        continue;
                    }
                    s.write_all(format!("GET /c{i}/{n} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
                    tally.written.fetch_add(1, Ordering::SeqCst);
                    used = true;
                    match read_response(s) {
                        Ok((200, close, body)) => {
                            // Set before the signal is sent: unset now, the
                            // response was made before the drain began.
                            let before_sigterm = sigterm.get().is_none();
                            assert_eq!(body, format!("ok /c{i}/{n}").into_bytes());
                            tally.answered.fetch_add(1, Ordering::SeqCst);
                            if close {
                                if before_sigterm {
                                    tally.closed_before_sigterm.fetch_add(1, Ordering::SeqCst);
                                }
                                assert_eq!(s.read(&mut [0u8; 1]).unwrap_or(0), 0, "data after Connection: close");
                                tally.closed_by_response.fetch_add(1, Ordering::SeqCst);
                                conn = None;
                            }
                        }
                        Ok((status, ..)) => panic!("client {i}: status {status}"),
                        Err(e) => {
                            eprintln!("client {i}: request {n} got no response: {e}");
                            tally.lost.fetch_add(1, Ordering::SeqCst);
                            conn = None;
                        }
                    }
                    if sleeper {
                        // One request, then the connection stays unused
                        // until well after the delay.
                        let at = eventually_blocking("SIGTERM", WITHIN, || sigterm.get().copied());
                        let wake = at + delay + Duration::from_millis(700);
                        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
                    } else {
                        std::thread::sleep(think(n));
                    }
                }
            })
        })
        .collect();
    // Every client settles into keep-alive first.
    std::thread::sleep(Duration::from_millis(800));
    sigterm.set(Instant::now()).unwrap();
    hg.signal("TERM");
    eventually_blocking("readiness 503", WITHIN, || (hg.admin_get("/readyz").0 == 503).then_some(()));
    // Endpoint removal, well inside the delay.
    std::thread::sleep(Duration::from_millis(300));
    removed.store(true, Ordering::SeqCst);
    assert_eq!(hg.wait_exit(WITHIN).code(), Some(0));
    for c in clients {
        c.join().expect("a client failed");
    }
    let get = |a: &AtomicUsize| a.load(Ordering::SeqCst);
    let (written, answered) = (get(&tally.written), get(&tally.answered));
    eprintln!(
        "{CLIENTS} keep-alive clients across SIGTERM: {written} requests written, {answered} answered, {} lost; \
         {} connections closed by a `Connection: close` response, {} found closed while idle",
        get(&tally.lost),
        get(&tally.closed_by_response),
        get(&tally.closed_while_idle)
    );
    assert_eq!(get(&tally.lost), 0, "requests written on an open connection went unanswered");
    assert_eq!(written, answered);
    assert_eq!(get(&tally.closed_before_sigterm), 0, "keep-alive must hold before the drain");
    assert!(get(&tally.closed_by_response) >= CLIENTS - CLIENTS / 8, "each active client was told to leave");
    assert_eq!(get(&tally.closed_while_idle), CLIENTS / 8, "each sleeper's idle connection was closed");
}

/// Upgrade an HTTP connection to the test app's echo protocol; returns the
/// `101` head.
fn upgrade(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect_timeout(&addr, STEP).unwrap();
    s.set_read_timeout(Some(WITHIN)).unwrap();
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "EOF in the 101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    (s, head)
}

/// Upgraded tunnels are left as they are by the drain: one opened before
/// SIGTERM and one opened during `drain.delay` (its `101` carries no
/// `Connection: close`) keep relaying after the listener stopped accepting,
/// and their close ends the drain.
#[test]
fn upgraded_tunnels_keep_relaying_through_the_drain() {
    let app = Upstream::start();
    let mut hg = start(app.addr, echo(), "500ms", "20s");
    let web = hg.listeners[0];
    let (mut before, _) = upgrade(web);
    round_trip(&mut before, b"before");
    hg.signal("TERM");
    eventually_blocking("readiness 503", WITHIN, || (hg.admin_get("/readyz").0 == 503).then_some(()));
    let (mut during, head) = upgrade(web);
    assert!(!head.contains("connection: close"), "a 101 during the drain: {head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    round_trip(&mut during, b"during the delay");
    eventually_blocking("new connections refused", WITHIN, || refused(web).then_some(()));
    round_trip(&mut before, b"after the stop");
    round_trip(&mut during, b"after the stop");
    let closed = Instant::now();
    drop(before);
    drop(during);
    assert_eq!(hg.wait_exit(WITHIN).code(), Some(0));
    assert!(closed.elapsed() < Duration::from_secs(10), "the 20 s timeout is not waited for");
}
