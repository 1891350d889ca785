//! Hostile servers against the real binary: small fake Redis, AMQP, HTTP
//! and TCP servers that misbehave (garbage, truncation, huge length
//! prefixes, a byte per second, silence, answers ahead of the question,
//! resets mid-reply, floods, echoed passwords, megabytes of text).
//!
//! Each case asserts the cause, a bound on the check's time, a bound on the
//! process's memory (VmRSS) and a bounded message free of secrets in
//! `/status` and the log; the flood cases also assert that a healthy
//! dependency checked by the same process keeps its check rate and timing
//! and that `/livez` stays 200.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::eventually_blocking;
use support::healthgate::Healthgate;

const WITHIN: Duration = Duration::from_secs(10);
/// The hostile dependencies' check timeout (ms).
const TIMEOUT_MS: u64 = 300;
/// The healthy dependency's check interval (ms).
const HEALTHY_INTERVAL_MS: u64 = 100;
/// Memory bound for the whole process.
const MAX_RSS_KIB: u64 = 80 * 1024;
/// How much later than its interval the healthy dependency's next verdict
/// may come while another dependency misbehaves (the isolation guarantee;
/// the README's Reliability section states the measured figure).
const MAX_DELAY_MS: u64 = 150;

// === Fake servers ===

/// Serves every accepted connection with `handle` on its own thread.
fn serve(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            let h = handle.clone();
            std::thread::spawn(move || h(s));
        }
    });
    addr
}

/// Sends `bytes` forever (until the peer goes away).
fn flood(s: &mut TcpStream, bytes: &[u8]) {
    let chunk = bytes.repeat((64 * 1024 / bytes.len()).max(1));
    while s.write_all(&chunk).is_ok() {}
}

/// Keeps the connection open and silent for a long time.
fn silence(s: &TcpStream) {
    let mut s = s;
    let mut b = [0u8; 1024];
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
}

/// Closes with a RST instead of a FIN.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// Reads one Redis command (the client sends one and waits); its name, upper-cased.
fn redis_command(s: &mut TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).ok().filter(|n| *n > 0)?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    Some(text.split("\r\n").nth(2).unwrap_or("").to_ascii_uppercase())
}

/// A Redis server that answers `INFO` and `AUTH` normally and `PING` with `ping(n, stream)`.
fn redis(ping: impl Fn(usize, &mut TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let pings = Arc::new(AtomicUsize::new(0));
    serve(move |mut s| {
        while let Some(cmd) = redis_command(&mut s) {
            let ok = match cmd.as_str() {
                "INFO" => s.write_all(b"$31\r\n# Server\r\nredis_version:7.2.4\r\n\r\n").is_ok(),
                "AUTH" => s.write_all(b"+OK\r\n").is_ok(),
                "QUIT" => s.write_all(b"+OK\r\n").is_ok(),
                _ => {
                    ping(pings.fetch_add(1, Ordering::SeqCst), &mut s);
                    true
                }
            };
            if !ok {
                return;
            }
        }
    })
}

/// AMQP frames and methods, as a broker sends them.
mod amqp {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    pub fn frame(kind: u8, ch: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&ch.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    pub fn method(ch: u16, class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(args);
        frame(1, ch, &p)
    }

    pub fn long(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    /// `connection.start` with protocol `major-minor`, a `version` property and `mechanisms`.
    pub fn start(major: u8, minor: u8, version: &[u8], mechanisms: &[u8]) -> Vec<u8> {
        let mut table = vec![7];
        table.extend_from_slice(b"version");
        table.push(b'S');
        table.extend_from_slice(&long(version));
        let mut args = vec![major, minor];
        args.extend_from_slice(&long(&table));
        args.extend_from_slice(&long(mechanisms));
        args.extend_from_slice(&long(b"en_US"));
        method(0, 10, 10, &args)
    }

    pub fn tune(frame_max: u32) -> Vec<u8> {
        let mut a = 2047u16.to_be_bytes().to_vec();
        a.extend_from_slice(&frame_max.to_be_bytes());
        a.extend_from_slice(&0u16.to_be_bytes());
        method(0, 10, 30, &a)
    }

    /// `connection.close` with `code` and `text`.
    pub fn close(code: u16, text: &[u8]) -> Vec<u8> {
        let mut a = code.to_be_bytes().to_vec();
        a.push(text.len() as u8);
        a.extend_from_slice(text);
        a.extend_from_slice(&[0, 0, 0, 0]);
        method(0, 10, 50, &a)
    }

    /// The next frame: (type, channel, payload).
    pub fn read_frame(s: &mut TcpStream) -> Option<(u8, u16, Vec<u8>)> {
        let mut h = [0u8; 7];
        s.read_exact(&mut h).ok()?;
        let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
        let mut p = vec![0u8; size + 1];
        s.read_exact(&mut p).ok()?;
        p.pop();
        Some((h[0], u16::from_be_bytes([h[1], h[2]]), p))
    }

    /// The next method frame: (channel, class, method).
    pub fn read_method(s: &mut TcpStream) -> Option<(u16, u16, u16)> {
        loop {
            let (kind, ch, p) = read_frame(s)?;
            if kind == 1 && p.len() >= 4 {
                return Some((ch, u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])));
            }
        }
    }

    /// Reads the protocol header.
    pub fn header(s: &mut TcpStream) -> Option<()> {
        let mut h = [0u8; 8];
        s.read_exact(&mut h).ok()
    }

    /// The whole handshake up to `connection.open-ok`.
    pub fn login(s: &mut TcpStream, frame_max: u32) -> Option<()> {
        header(s)?;
        s.write_all(&start(0, 9, b"3.13.0", b"PLAIN AMQPLAIN")).ok()?;
        read_method(s)?; // start-ok
        s.write_all(&tune(frame_max)).ok()?;
        read_method(s)?; // tune-ok
        read_method(s)?; // open
        s.write_all(&method(0, 10, 41, &[0])).ok()
    }

    /// Answers channel.open and channel.close as a broker does; after each
    /// channel.close-ok calls `after_close`; answers connection.close.
    pub fn round_trips(s: &mut TcpStream, mut after_close: impl FnMut(&mut TcpStream)) {
        while let Some((ch, class, id)) = read_method(s) {
            let reply = match (class, id) {
                (20, 10) => method(ch, 20, 11, &long(b"")),
                (20, 40) => method(ch, 20, 41, &[]),
                (10, 50) => method(0, 10, 51, &[]),
                _ => continue,
            };
            if s.write_all(&reply).is_err() {
                return;
            }
            if (class, id) == (20, 40) {
                after_close(s);
            }
        }
    }
}

/// Reads an HTTP request head.
fn http_request(s: &mut TcpStream) -> Option<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).ok().filter(|n| *n > 0)?;
        head.extend_from_slice(&b[..n]);
    }
    Some(())
}

/// An HTTP server answering each request with `respond`.
fn http(respond: impl Fn(&mut TcpStream) -> bool + Send + Sync + 'static) -> SocketAddr {
    serve(move |mut s| {
        while http_request(&mut s).is_some() {
            if !respond(&mut s) {
                return;
            }
        }
    })
}

// === healthgate and what it shows ===

/// healthgate with a healthy `tcp` dependency named `healthy` (checked every
/// 100 ms) and `deps` (YAML list items, indented by two spaces).
fn start(deps: &str, env: &[(&str, &str)]) -> Healthgate {
    let healthy = support::always_up();
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\n  liveness_stall: 2s\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"127.0.0.1:9\"\n\
         dependencies:\n  - name: healthy\n    type: tcp\n    address: \"{healthy}\"\n    interval: {HEALTHY_INTERVAL_MS}ms\n    timeout: {TIMEOUT_MS}ms\n    jitter: 0\n    rise: 1\n    fall: 1\n{deps}"
    );
    Healthgate::start_with_env(&cfg, env)
}

/// A hostile dependency's YAML: `kind` and its keys (each line indented by 4).
fn dep(name: &str, kind_and_keys: &str) -> String {
    format!(
        "  - name: {name}\n{kind_and_keys}    interval: 200ms\n    timeout: {TIMEOUT_MS}ms\n    rise: 1\n    fall: 1\n    impact: observe\n"
    )
}

fn dep_status(hg: &Healthgate, name: &str) -> serde_json::Value {
    hg.status()["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == name).cloned().unwrap()
}

/// Waits until dependency `name` has failed with `cause`; returns its status.
fn wait_cause(hg: &Healthgate, name: &str, cause: &str) -> serde_json::Value {
    eventually_blocking(&format!("{name} failing with {cause}"), WITHIN, || {
        let d = dep_status(hg, name);
        (d["last_ok"] == false && d["last_cause"] == cause).then_some(d)
    })
}

/// Waits until dependency `name` is up.
fn wait_up(hg: &Healthgate, name: &str) -> serde_json::Value {
    eventually_blocking(&format!("{name} up"), WITHIN, || {
        let d = dep_status(hg, name);
        (d["state"] == "up").then_some(d)
    })
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// What the healthy dependency and the process did during a window.
#[derive(Debug)]
struct Observed {
    /// Checks of the healthy dependency.
    checks: u64,
    /// Longest time between the ends of two consecutive checks of it, from
    /// their `last_check` timestamps (ms resolution), ms.
    max_gap_ms: u64,
    /// Every `/livez` answer was 200.
    livez_ok: bool,
    /// Highest VmRSS seen, KiB.
    max_rss_kib: u64,
}

/// Milliseconds since midnight of an RFC 3339 UTC timestamp (`...T02:59:05.922Z`).
fn ms_of_day(ts: &str) -> u64 {
    let time = ts.split_once('T').unwrap().1.trim_end_matches('Z');
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<u64>().unwrap());
    let (h, m, sec) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    let ms: u64 = format!("{frac:0<3}")[..3].parse().unwrap();
    ((h * 60 + m) * 60 + sec) * 1000 + ms
}

/// Watches the healthy dependency, `/livez` and the memory for `window`.
fn observe(hg: &Healthgate, window: Duration) -> Observed {
    let started = Instant::now();
    let sample = || {
        let d = dep_status(hg, "healthy");
        (d["checks_total"].as_u64().unwrap(), ms_of_day(d["last_check"].as_str().unwrap()))
    };
    let (first, mut at) = sample();
    let (mut last, mut max_gap) = (first, 0);
    let (mut livez_ok, mut max_rss) = (true, 0);
    while started.elapsed() < window {
        let (n, t) = sample();
        if n == last + 1 {
            max_gap = max_gap.max(t.saturating_sub(at));
        }
        if n != last {
            (last, at) = (n, t);
        }
        livez_ok &= hg.admin_get("/livez").0 == 200;
        max_rss = max_rss.max(rss_kib(hg.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = Observed { checks: last - first, max_gap_ms: max_gap, livez_ok, max_rss_kib: max_rss };
    eprintln!("observed over {window:?}: {o:?}");
    o
}

/// The isolation guarantee: the healthy dependency kept its rate and timing,
/// `/livez` stayed 200, memory stayed bounded.
fn assert_isolated(hg: &Healthgate, window: Duration) {
    let o = observe(hg, window);
    let expected = window.as_millis() as u64 / HEALTHY_INTERVAL_MS;
    assert!(
        o.checks * 10 >= expected * 7,
        "the healthy dependency was checked {} times, expected ~{expected}",
        o.checks
    );
    assert!(
        o.max_gap_ms <= HEALTHY_INTERVAL_MS + MAX_DELAY_MS,
        "the healthy dependency's checks were {} ms apart (interval {HEALTHY_INTERVAL_MS} ms)",
        o.max_gap_ms
    );
    assert!(o.livez_ok, "/livez failed during the window");
    assert!(o.max_rss_kib < MAX_RSS_KIB, "RSS reached {} KiB", o.max_rss_kib);
    assert_eq!(dep_status(hg, "healthy")["state"], "up");
}

/// The failure of `d` took no longer than its timeout (plus scheduling).
fn assert_timely(d: &serde_json::Value) {
    let latency = d["last_latency_seconds"].as_f64().unwrap();
    assert!(latency <= (TIMEOUT_MS + 100) as f64 / 1000.0, "the check took {latency} s (timeout {TIMEOUT_MS} ms): {d}");
}

/// The published message is bounded and, with `secret`, free of it in
/// `/status` and in the log.
fn assert_clean(hg: &Healthgate, d: &serde_json::Value, secret: Option<&str>) {
    let message = d["last_message"].as_str().unwrap_or("");
    assert!(message.len() <= 1024 + 3, "a {} byte message: {}", message.len(), &message[..200.min(message.len())]);
    assert!(!message.chars().any(char::is_control), "control characters in {message:?}");
    if let Some(secret) = secret {
        let status = hg.admin_get("/status").1;
        assert!(!status.contains(secret), "the secret is in /status");
        let logs = hg.logs.lock().unwrap().join("\n");
        assert!(!logs.contains(secret), "the secret is in the log");
        let metrics = hg.admin_get("/metrics").1;
        assert!(!metrics.contains(secret), "the secret is in /metrics");
    }
}

// === Item by item ===

#[test]
fn amqp_heartbeat_flood_after_channel_close_ok_costs_only_its_own_check() {
    let mq = serve(|mut s| {
        if amqp::login(&mut s, 131_072).is_some() {
            let heartbeat = amqp::frame(8, 0, &[]);
            amqp::round_trips(&mut s, |s| flood(s, &heartbeat));
        }
    });
    let hg = start(&dep("mq", &format!("    type: amqp\n    url: amqp://127.0.0.1:{}/\n", mq.port())), &[]);
    let d = wait_cause(&hg, "mq", "protocol");
    assert!(d["last_message"].as_str().unwrap().contains("unasked"), "{d}");
    assert_timely(&d);
    assert_clean(&hg, &d, None);
    assert_isolated(&hg, Duration::from_secs(3));
}

#[test]
fn amqp_broker_stalling_after_login_leaves_at_most_two_abandoned_connections_per_node() {
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    let mq = serve(move |mut s| {
        counter.fetch_add(1, Ordering::SeqCst);
        if amqp::login(&mut s, 131_072).is_some() {
            // Logged in; then never answers again, and reads until the client goes.
            silence(&s);
        }
        counter.fetch_sub(1, Ordering::SeqCst);
    });
    let hg = start(&dep("mq", &format!("    type: amqp\n    url: amqp://127.0.0.1:{}/\n", mq.port())), &[]);
    let d = wait_cause(&hg, "mq", "read_timeout");
    assert_timely(&d);
    // 15 checks in 3 s: each gives up on its connection after the timeout.
    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(3) {
        most = most.max(open.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The one being checked, two closing in the background, one just dropped.
    assert!(most <= 4, "{most} connections open at once");
    assert!(rss_kib(hg.pid()) < MAX_RSS_KIB);
}

#[test]
fn amqp_frames_larger_than_the_negotiated_frame_max_are_refused() {
    let mq = serve(|mut s| {
        if amqp::login(&mut s, 4096).is_some() {
            // Answers channel.open with the header of a 4 MiB frame, and stalls.
            if amqp::read_method(&mut s).is_some() {
                let mut head = vec![3u8, 0, 1];
                head.extend_from_slice(&(4u32 << 20).to_be_bytes());
                let _ = s.write_all(&head);
                let _ = s.write_all(&vec![b'x'; 64 * 1024]);
                silence(&s);
            }
        }
    });
    let hg = start(&dep("mq", &format!("    type: amqp\n    url: amqp://127.0.0.1:{}/\n", mq.port())), &[]);
    let d = wait_cause(&hg, "mq", "protocol");
    assert!(d["last_message"].as_str().unwrap().contains("frame_max"), "{d}");
    assert_timely(&d);
    assert!(rss_kib(hg.pid()) < MAX_RSS_KIB);
}

#[test]
fn secrets_echoed_by_servers_never_reach_status_metrics_or_logs() {
    const PW: &str = "Sup3r-S3cret-Passw0rd";
    let redis = serve(|mut s| {
        while let Some(cmd) = redis_command(&mut s) {
            let reply = match cmd.as_str() {
                "AUTH" => format!("-ERR invalid password {PW} for redis://app:{PW}@cache:6379\r\n"),
                _ => "+OK\r\n".into(),
            };
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    });
    let mq = serve(|mut s| {
        amqp::header(&mut s);
        let _ = s.write_all(&amqp::start(0, 9, b"3.13.0", b"PLAIN"));
        if amqp::read_method(&mut s).is_some() {
            let text = format!("ACCESS_REFUSED - PLAIN login refused: \0app\0{PW}");
            let _ = s.write_all(&amqp::close(403, text.as_bytes()));
            silence(&s);
        }
    });
    let deps = dep("cache", &format!("    type: redis\n    address: \"{redis}\"\n    password_env: HG_PW\n"))
        + &dep(
            "mq",
            &format!("    type: amqp\n    url: amqp://app@127.0.0.1:{}/\n    password_env: HG_PW\n", mq.port()),
        );
    let hg = start(&deps, &[("HG_PW", PW)]);
    let cache = wait_cause(&hg, "cache", "auth");
    let mq = wait_cause(&hg, "mq", "auth");
    for d in [&cache, &mq] {
        assert!(d["last_message"].as_str().unwrap().contains("***"), "{d}");
        assert_clean(&hg, d, Some(PW));
    }
    eventually_blocking("the down events logged", WITHIN, || (hg.events("dependency down").len() >= 2).then_some(()));
    assert_clean(&hg, &mq, Some(PW));
}

#[test]
fn unbounded_server_text_is_capped_before_status_and_logs() {
    // 50 KB of version and of mechanisms without PLAIN (the frame fits the 128 KiB limit).
    let mechanisms = vec![b'M'; 50_000];
    let mq = serve(move |mut s| {
        amqp::header(&mut s);
        let _ = s.write_all(&amqp::start(0, 9, &vec![b'9'; 50_000], &mechanisms));
        silence(&s);
    });
    // A ~1 MB redis_version, then a 60 KB integer line to PING.
    let redis = serve(|mut s| {
        while let Some(cmd) = redis_command(&mut s) {
            let reply = match cmd.as_str() {
                "INFO" => {
                    let body = format!("# Server\r\nredis_version:{}\r\n", "7".repeat(1_000_000));
                    format!("${}\r\n{body}\r\n", body.len())
                }
                _ => format!(":{}\r\n", "1".repeat(60_000)),
            };
            if s.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    });
    let deps = dep("mq", &format!("    type: amqp\n    url: amqp://127.0.0.1:{}/\n", mq.port()))
        + &dep("cache", &format!("    type: redis\n    address: \"{redis}\"\n"));
    let hg = start(&deps, &[]);
    let mq = wait_cause(&hg, "mq", "protocol");
    assert!(mq["last_message"].as_str().unwrap().contains("no PLAIN"), "{mq}");
    let cache = wait_cause(&hg, "cache", "protocol");
    for d in [&mq, &cache] {
        assert_clean(&hg, d, None);
        assert_timely(d);
    }
    let version = dep_status(&hg, "cache")["details"]["server_version"].as_str().unwrap().to_string();
    assert!(version.len() <= 128 + 3, "a {} byte version", version.len());
    assert!(hg.admin_get("/status").1.len() < 16 * 1024, "/status grew");
    assert!(hg.logs.lock().unwrap().iter().all(|l| l.len() < 4096), "a long log line");
    assert!(rss_kib(hg.pid()) < MAX_RSS_KIB);
}

#[test]
fn redis_bytes_left_after_a_reply_are_a_protocol_error_never_the_next_answer() {
    // Answers the first PING with 100 000 PONGs, then never again.
    let flooder = redis(|n, s| {
        if n == 0 {
            let _ = s.write_all(&b"+PONG\r\n".repeat(100_000));
        }
    });
    // Answers every PING with a PONG and trailing junk.
    let junk = redis(|_, s| {
        let _ = s.write_all(b"+PONG\r\n+JUNK\r\n");
    });
    let deps = dep("cache", &format!("    type: redis\n    address: \"{flooder}\"\n"))
        + &dep("junk", &format!("    type: redis\n    address: \"{junk}\"\n"));
    let hg = start(&deps, &[]);
    let d = wait_cause(&hg, "cache", "protocol");
    assert!(d["last_message"].as_str().unwrap().contains("followed the reply"), "{d}");
    // The next checks get no answer at all: never the buffered PONGs.
    let d = wait_cause(&hg, "cache", "read_timeout");
    assert_eq!(d["state"], "down");
    assert_timely(&d);
    // Trailing junk is a failure every time, not every other time.
    wait_cause(&hg, "junk", "protocol");
    let junk = eventually_blocking("junk failing three times in a row", WITHIN, || {
        let d = dep_status(&hg, "junk");
        (d["consecutive_failures"].as_u64().unwrap() >= 3).then_some(d)
    });
    assert_eq!(junk["state"], "down");
    assert_clean(&hg, &junk, None);
}

#[test]
fn http_endless_100_continue_is_bounded_in_count_and_time() {
    let web = http(|s| {
        flood(s, b"HTTP/1.1 100 Continue\r\n\r\n");
        false
    });
    let hg = start(&dep("web", &format!("    type: http\n    url: http://{web}/health\n")), &[]);
    let d = wait_cause(&hg, "web", "protocol");
    assert!(d["last_message"].as_str().unwrap().contains("informational"), "{d}");
    assert_timely(&d);
    assert_clean(&hg, &d, None);
    assert_isolated(&hg, Duration::from_secs(3));
}

#[test]
fn http_healthy_200_with_a_300_kib_body_passes_without_expect_body() {
    let web = http(|s| {
        let body = vec![b'x'; 300 * 1024];
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).is_ok() && s.write_all(&body).is_ok()
    });
    let hg = start(&dep("web", &format!("    type: http\n    url: http://{web}/health\n")), &[]);
    let d = wait_up(&hg, "web");
    assert_eq!(d["last_ok"], true, "{d}");
    eventually_blocking("three passing checks", WITHIN, || {
        (dep_status(&hg, "web")["consecutive_successes"].as_u64().unwrap() >= 3).then_some(())
    });
}

#[test]
fn http_reset_in_the_middle_of_the_body_is_reset() {
    let web = http(|s| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789");
        std::thread::sleep(Duration::from_millis(20));
        reset(s.try_clone().unwrap());
        false
    });
    let hg = start(&dep("web", &format!("    type: http\n    url: http://{web}/health\n")), &[]);
    let d = wait_cause(&hg, "web", "reset");
    assert_timely(&d);
}

#[test]
fn http_url_with_credentials_is_refused_at_config_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let cfg = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\ndependencies:\n  - name: api\n    type: http\n    url: http://user:Pw-In-Url@127.0.0.1:1/health\n";
    std::fs::write(&path, cfg).unwrap();
    let out = std::process::Command::new(support::healthgate::binary())
        .args(["validate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dependencies[0].url") && text.contains("credentials"), "{text}");
    assert!(!text.contains("Pw-In-Url"), "{text}");
}

#[test]
fn redis_huge_array_arriving_in_small_pieces_is_parsed_once() {
    // Each PING is answered with a 350 KB array of 50 000 integers, 1 KiB per write.
    let server = redis(|_, s| {
        let mut reply = b"*50000\r\n".to_vec();
        for _ in 0..50_000 {
            reply.extend_from_slice(b":1234\r\n");
        }
        let _ = s.set_nodelay(true);
        for piece in reply.chunks(1024) {
            if s.write_all(piece).is_err() {
                return;
            }
        }
    });
    let hg = start(&dep("cache", &format!("    type: redis\n    address: \"{server}\"\n")), &[]);
    wait_cause(&hg, "cache", "protocol");
    let (cpu0, t0) = (cpu_time(hg.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let share = (cpu_time(hg.pid()) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    eprintln!("healthgate used {:.0} % of a core", share * 100.0);
    // Linear: ~35 ms per check in a debug build (25 % of a core measured
    // with the 200 ms interval, up to a third on a loaded machine); parsing
    // again on every read (the old way) kept the check busy to its timeout,
    // every time: a whole core.
    assert!(share < 0.6, "healthgate used {:.0} % of a core", share * 100.0);
    let d = dep_status(&hg, "cache");
    assert!(d["last_message"].as_str().unwrap().contains("array of 50000"), "{d}");
}

#[test]
fn amqp_connection_start_announcing_version_1_0_is_a_protocol_error() {
    let mq = serve(|mut s| {
        amqp::header(&mut s);
        let _ = s.write_all(&amqp::start(1, 0, b"1.0", b"PLAIN"));
        amqp::read_method(&mut s);
        let _ = s.write_all(&amqp::tune(131_072));
        amqp::read_method(&mut s);
        amqp::read_method(&mut s);
        let _ = s.write_all(&amqp::method(0, 10, 41, &[0]));
        amqp::round_trips(&mut s, |_| {});
    });
    let hg = start(&dep("mq", &format!("    type: amqp\n    url: amqp://127.0.0.1:{}/\n", mq.port())), &[]);
    let d = wait_cause(&hg, "mq", "protocol");
    assert!(d["last_message"].as_str().unwrap().contains("not 0-9-1"), "{d}");
    std::thread::sleep(Duration::from_millis(600));
    assert_ne!(dep_status(&hg, "mq")["state"], "up");
}

#[test]
fn livez_stays_200_with_no_dependencies() {
    let cfg = "workers: 1\nadmin:\n  listen: 127.0.0.1:0\n  liveness_stall: 1s\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"127.0.0.1:9\"\ndependencies: []\n";
    let hg = Healthgate::start(cfg);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let (code, body) = hg.admin_get("/livez");
        assert_eq!(code, 200, "after {:?}: {body}", started.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

// === Misbehaviour by protocol ===

#[test]
fn misbehaving_redis_servers_each_get_a_precise_cause_in_bounded_time() {
    let cases: Vec<(&str, SocketAddr, &str)> = vec![
        (
            "garbage",
            redis(|_, s| {
                let _ = s.write_all(b"\x00\x01garbage\r\n");
            }),
            "protocol",
        ),
        (
            "truncated",
            redis(|_, s| {
                let _ = s.write_all(b"$10\r\nabc");
                let _ = s.shutdown(std::net::Shutdown::Both);
            }),
            "reset",
        ),
        (
            "huge_length",
            redis(|_, s| {
                let _ = s.write_all(b"$99999999999\r\n");
            }),
            "protocol",
        ),
        (
            "huge_array",
            redis(|_, s| {
                let _ = s.write_all(b"*99999999999\r\n");
            }),
            "protocol",
        ),
        (
            "byte_per_second",
            redis(|_, s| {
                for b in b"+PONG\r\n" {
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }),
            "read_timeout",
        ),
        ("silent", redis(|_, _| std::thread::sleep(Duration::from_secs(60))), "read_timeout"),
        (
            "answer_ahead",
            serve(|mut s| {
                let _ = s.write_all(b"+PONG\r\n+PONG\r\n");
                silence(&s);
            }),
            "protocol",
        ),
        (
            "reset_mid_reply",
            redis(|_, s| {
                let _ = s.write_all(b"$100\r\nhalf");
                std::thread::sleep(Duration::from_millis(20));
                // RST when the server loop drops the socket (its next read sees the end).
                let _ = socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO));
                let _ = s.shutdown(std::net::Shutdown::Read);
            }),
            "reset",
        ),
        ("flood", redis(|_, s| flood(s, b"+PONG\r\n")), "protocol"),
    ];
    let deps: String =
        cases.iter().map(|(name, addr, _)| dep(name, &format!("    type: redis\n    address: \"{addr}\"\n"))).collect();
    let hg = start(&deps, &[]);
    for (name, _, cause) in &cases {
        let d = wait_cause(&hg, name, cause);
        assert_timely(&d);
        assert_clean(&hg, &d, None);
    }
    assert_isolated(&hg, Duration::from_secs(2));
}

#[test]
fn misbehaving_amqp_servers_each_get_a_precise_cause_in_bounded_time() {
    let cases: Vec<(&str, SocketAddr, &str)> = vec![
        (
            "garbage",
            serve(|mut s| {
                amqp::header(&mut s);
                let _ = s.write_all(b"\x07garbage garbage garbage");
                silence(&s);
            }),
            "protocol",
        ),
        (
            "truncated",
            serve(|mut s| {
                amqp::header(&mut s);
                let start = amqp::start(0, 9, b"3.13.0", b"PLAIN");
                let _ = s.write_all(&start[..start.len() / 2]);
            }),
            "reset",
        ),
        (
            "huge_length",
            serve(|mut s| {
                amqp::header(&mut s);
                let _ = s.write_all(&[1, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
                silence(&s);
            }),
            "protocol",
        ),
        (
            "byte_per_second",
            serve(|mut s| {
                amqp::header(&mut s);
                for b in amqp::start(0, 9, b"3.13.0", b"PLAIN") {
                    if s.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }),
            "read_timeout",
        ),
        ("silent", serve(|s| silence(&s)), "read_timeout"),
        (
            "reset_mid_reply",
            serve(|mut s| {
                amqp::header(&mut s);
                let start = amqp::start(0, 9, b"3.13.0", b"PLAIN");
                let _ = s.write_all(&start[..20]);
                std::thread::sleep(Duration::from_millis(20));
                reset(s);
            }),
            "reset",
        ),
        (
            "flood_while_waiting",
            serve(|mut s| {
                if amqp::login(&mut s, 131_072).is_some() && amqp::read_method(&mut s).is_some() {
                    flood(&mut s, &amqp::frame(8, 0, &[]));
                }
            }),
            "protocol",
        ),
    ];
    let deps: String = cases
        .iter()
        .map(|(name, addr, _)| dep(name, &format!("    type: amqp\n    url: amqp://127.0.0.1:{}/\n", addr.port())))
        .collect();
    let hg = start(&deps, &[]);
    for (name, _, cause) in &cases {
        let d = wait_cause(&hg, name, cause);
        assert_timely(&d);
        assert_clean(&hg, &d, None);
    }
    assert_isolated(&hg, Duration::from_secs(2));
}

#[test]
fn misbehaving_http_servers_each_get_a_precise_cause_in_bounded_time() {
    let cases: Vec<(&str, SocketAddr, &str)> = vec![
        (
            "garbage",
            http(|s| {
                let _ = s.write_all(b"\x00\x01\x02 not http\r\n\r\n");
                false
            }),
            "protocol",
        ),
        (
            "truncated_head",
            http(|s| {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-le");
                false
            }),
            "reset",
        ),
        (
            "huge_content_length",
            http(|s| {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999\r\n\r\n");
                flood(s, b"x");
                false
            }),
            "up",
        ),
        (
            "byte_per_second",
            http(|s| {
                for b in b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" {
                    if s.write_all(&[*b]).is_err() {
                        return false;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                true
            }),
            "read_timeout",
        ),
        (
            "silent",
            http(|s| {
                silence(s);
                false
            }),
            "read_timeout",
        ),
        (
            "endless_headers",
            http(|s| {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n");
                flood(s, b"x-flood: yes\r\n");
                false
            }),
            "protocol",
        ),
    ];
    let deps: String =
        cases.iter().map(|(name, addr, _)| dep(name, &format!("    type: http\n    url: http://{addr}/\n"))).collect();
    let hg = start(&deps, &[]);
    for (name, _, cause) in &cases {
        let d = if *cause == "up" { wait_up(&hg, name) } else { wait_cause(&hg, name, cause) };
        assert_timely(&d);
        assert_clean(&hg, &d, None);
    }
    assert_isolated(&hg, Duration::from_secs(2));
}

#[test]
fn misbehaving_tcp_servers_each_get_a_precise_cause_in_bounded_time() {
    let cases: Vec<(&str, SocketAddr, &str)> = vec![
        ("garbage_flood", serve(|mut s| flood(&mut s, b"garbage ")), "unexpected_response"),
        ("silent", serve(|s| silence(&s)), "read_timeout"),
        (
            "byte_per_second",
            serve(|mut s| {
                for b in b"READY" {
                    if s.write_all(&[*b]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }),
            "read_timeout",
        ),
        (
            "reset_mid_reply",
            serve(|mut s| {
                let _ = s.write_all(b"REA");
                std::thread::sleep(Duration::from_millis(20));
                reset(s);
            }),
            "reset",
        ),
        (
            "truncated",
            serve(|mut s| {
                let _ = s.write_all(b"REA");
            }),
            "reset",
        ),
    ];
    let deps: String = cases
        .iter()
        .map(|(name, addr, _)| dep(name, &format!("    type: tcp\n    address: \"{addr}\"\n    expect: READY\n")))
        .collect();
    let hg = start(&deps, &[]);
    for (name, _, cause) in &cases {
        let d = wait_cause(&hg, name, cause);
        assert_timely(&d);
        assert_clean(&hg, &d, None);
    }
    assert_isolated(&hg, Duration::from_secs(2));
}
