//! HTTP/2 against the real binary, written as raw frames: the drain's
//! graceful GOAWAY, and hostile clients
//! (a small frame writer and reader below): rapid reset (CVE-2023-44487), a
//! CONTINUATION flood, SETTINGS and PING floods from a client that never
//! reads, an oversized header list, more streams than
//! `http2_max_concurrent_streams`, and bad prefaces. Each time the process
//! stays up with bounded memory, and another client is served meanwhile.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::always_up;
use support::app::App;
use support::healthgate::{Healthgate, http_get};

const WITHIN: Duration = Duration::from_secs(15);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// RST_STREAM / GOAWAY codes.
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: 9-byte header, then the payload.
fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix, the first byte's high bits `high`.
fn hpack_int(out: &mut Vec<u8>, n: u32, high: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name, no Huffman.
fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 7, 0, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 7, 0, value.len());
    out.extend_from_slice(value);
}

/// The header block of `GET path` (`:method GET` and `:scheme http` from
/// the static table).
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    literal(&mut b, ":path", path.as_bytes());
    literal(&mut b, ":authority", b"test");
    b
}

/// A parsed frame.
#[derive(Debug)]
struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn code(&self) -> u32 {
        let at = if self.ty == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// A raw HTTP/2 client connection.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Raw {
    /// Connects and sends the preface and an empty SETTINGS.
    fn open(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(PREFACE).unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
        Raw { s, buf: Vec::new(), eof: false }
    }

    /// Reads the server's SETTINGS and acknowledges them, so its limits apply.
    fn handshake(&mut self) {
        let f = self.next_frame(WITHIN, |f| f.ty == SETTINGS && f.flags & ACK == 0).expect("server SETTINGS");
        assert_eq!(f.stream, 0);
        self.s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();
    }

    /// Reads until a frame matching `want` arrives (returned), EOF or `within`.
    fn next_frame(&mut self, within: Duration, want: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + within;
        loop {
            while self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16) | (usize::from(self.buf[1]) << 8) | usize::from(self.buf[2]);
                if self.buf.len() < 9 + len {
                    break;
                }
                let f = Frame {
                    ty: self.buf[3],
                    flags: self.buf[4],
                    stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap()) & 0x7fff_ffff,
                    payload: self.buf[9..9 + len].to_vec(),
                };
                self.buf.drain(..9 + len);
                if want(&f) {
                    return Some(f);
                }
            }
            if self.eof || Instant::now() >= deadline {
                return None;
            }
            self.fill(deadline);
        }
    }

    fn fill(&mut self, deadline: Instant) {
        let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        self.s.set_read_timeout(Some(wait.min(Duration::from_millis(200)))).unwrap();
        let mut chunk = [0u8; 16384];
        match self.s.read(&mut chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => self.eof = true,
        }
    }

    /// Whether the server closes the connection within `within` (frames read and dropped).
    fn closed_within(&mut self, within: Duration) -> bool {
        self.next_frame(within, |_| false);
        self.eof
    }
}

fn start(app: &App, extra: &str) -> Healthgate {
    // Accepts and closes: a listener that never accepts fills its backlog
    // with the checks' connections during a long test.
    let db = always_up();
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\n{extra}dependencies:\n  - name: db\n    type: tcp\n    address: \"{}\"\n    interval: 100ms\n    rise: 1\n",
        app.addr, db
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    hg
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The process is alive and another client is served.
fn still_serving(hg: &Healthgate) {
    let (status, body) = http_get(hg.listeners[0], "/other");
    assert_eq!((status, body.as_str()), (200, "app:GET /other"), "another client is served");
}

#[test]
fn rapid_reset_ends_the_connection_with_enhance_your_calm_and_the_app_sees_few_requests() {
    let app = App::start();
    app.set_delay(Duration::from_millis(200));
    let hg = start(&app, "");
    let mut c = Raw::open(hg.listeners[0]);
    c.handshake();
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &get_block("/reset")));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    // The server may close before the whole burst is written.
    let _ = c.s.write_all(&burst);
    let goaway = c.next_frame(WITHIN, |f| f.ty == GOAWAY).expect("GOAWAY");
    assert_eq!(goaway.code(), ENHANCE_YOUR_CALM, "{goaway:?}");
    assert!(c.closed_within(WITHIN), "the connection is closed");
    still_serving(&hg);
    let reached = app.requests();
    eprintln!("rapid reset: {reached} of 2000 reset streams reached the app");
    assert!(reached < 200, "a bounded number of reset streams reached the app: {reached} of 2000");
}

#[test]
fn a_continuation_flood_is_cut_before_it_is_buffered() {
    let app = App::start();
    let hg = start(&app, "");
    let before = rss_kib(hg.pid());
    let mut c = Raw::open(hg.listeners[0]);
    c.handshake();
    c.s.write_all(&frame(HEADERS, 0, 1, &get_block("/flood"))).unwrap();
    let mut piece = Vec::new();
    literal(&mut piece, "x-flood", &[b'a'; 1000]);
    let cont = frame(CONTINUATION, 0, 1, &piece);
    c.s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sent = 0usize;
    // Up to 64 MiB of header block; the server must give up long before.
    while sent < 64 << 20 {
        if c.s.write_all(&cont).is_err() {
            break;
        }
        sent += cont.len();
    }
    assert!(sent < 64 << 20, "the server kept reading an endless header block");
    assert!(c.closed_within(WITHIN), "the connection is closed");
    still_serving(&hg);
    let grown = rss_kib(hg.pid()).saturating_sub(before);
    eprintln!("CONTINUATION flood: cut after {sent} bytes; RSS grew {grown} KiB");
    assert!(grown < 32 * 1024, "memory bounded: grew {grown} KiB after {sent} bytes of CONTINUATION");
}

/// Floods `frame` from a client that never reads, until writes block;
/// memory stays bounded and other clients are served meanwhile.
fn flood_without_reading(flood: Vec<u8>) {
    let app = App::start();
    let hg = start(&app, "");
    let before = rss_kib(hg.pid());
    let mut c = Raw::open(hg.listeners[0]);
    c.s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut batch = Vec::new();
    for _ in 0..4096 {
        batch.extend_from_slice(&flood);
    }
    let mut sent = 0usize;
    while sent < 256 << 20 {
        // A write that blocks (the server stopped reading) or fails ends the flood.
        if c.s.write_all(&batch).is_err() {
            break;
        }
        sent += batch.len();
    }
    assert!(sent < 256 << 20, "the server read 256 MiB of frames without ever being read from");
    still_serving(&hg);
    let grown = rss_kib(hg.pid()).saturating_sub(before);
    eprintln!("flood of frame type {}: writes blocked after {sent} bytes; RSS grew {grown} KiB", flood[3]);
    assert!(grown < 32 * 1024, "memory bounded: grew {grown} KiB after {sent} bytes");
    drop(c);
    still_serving(&hg);
}

#[test]
fn a_settings_flood_from_a_client_that_never_reads_is_bounded() {
    // SETTINGS_INITIAL_WINDOW_SIZE = 65535: each needs an ACK.
    flood_without_reading(frame(SETTINGS, 0, 0, &[0x00, 0x04, 0x00, 0x00, 0xff, 0xff]));
}

#[test]
fn a_ping_flood_from_a_client_that_never_reads_is_bounded() {
    flood_without_reading(frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]));
}

#[test]
fn an_oversized_header_list_is_refused_and_the_connection_survives_it() {
    let app = App::start();
    let hg = start(&app, "    http2_max_header_list_size: 8192\n");
    let mut c = Raw::open(hg.listeners[0]);
    c.handshake();
    let mut block = get_block("/big");
    literal(&mut block, "x-big", &[b'b'; 12000]);
    // 16 KiB frames at most: HEADERS then CONTINUATION.
    let (first, rest) = block.split_at(8000);
    c.s.write_all(&frame(HEADERS, END_STREAM, 1, first)).unwrap();
    c.s.write_all(&frame(CONTINUATION, END_HEADERS, 1, rest)).unwrap();
    let answer = c.next_frame(WITHIN, |f| f.stream == 1 && (f.ty == HEADERS || f.ty == RST_STREAM) || f.ty == GOAWAY);
    let answer = answer.expect("the oversized request is answered");
    assert_ne!(answer.ty, GOAWAY, "refused per stream, not per connection: {answer:?}");
    if answer.ty == HEADERS {
        // `:status 431`: a literal with the static name `:status` (0x48)
        // and the Huffman-coded value "431" (0x83: 3 bytes).
        assert_eq!(answer.payload, [0x48, 0x83, 0x69, 0x90, 0xff], "{answer:?}");
    }
    assert_eq!(app.requests(), 0, "never forwarded");
    c.s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &get_block("/small"))).unwrap();
    let ok =
        c.next_frame(WITHIN, |f| f.stream == 3 && f.ty == HEADERS).expect("a normal request on the same connection");
    assert_eq!(ok.payload[0], 0x88, ":status 200 (static index 8)");
    still_serving(&hg);
}

#[test]
fn streams_over_max_concurrent_streams_are_refused() {
    let app = App::start();
    app.set_delay(Duration::from_millis(1500));
    let hg = start(&app, "    http2_max_concurrent_streams: 4\n");
    let mut c = Raw::open(hg.listeners[0]);
    c.handshake();
    let mut burst = Vec::new();
    for i in 0..10u32 {
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &get_block("/slow")));
    }
    c.s.write_all(&burst).unwrap();
    let mut refused = 0;
    while let Some(f) = c.next_frame(Duration::from_secs(1), |f| f.ty == RST_STREAM || f.ty == GOAWAY) {
        assert_eq!(f.ty, RST_STREAM, "{f:?}");
        assert_eq!(f.code(), REFUSED_STREAM, "{f:?}");
        refused += 1;
    }
    assert_eq!(refused, 6, "10 streams, 4 allowed at once");
    let mut answered = 0;
    while c.next_frame(WITHIN, |f| f.ty == HEADERS).is_some() {
        answered += 1;
        if answered == 4 {
            break;
        }
    }
    assert_eq!(answered, 4);
    assert_eq!(app.requests(), 4);
    still_serving(&hg);
}

#[test]
fn a_bad_preface_is_closed_and_a_stalled_preface_times_out() {
    let app = App::start();
    let hg = start(&app, "    header_read_timeout: 1s\n");
    // Right start, wrong end: not HTTP/2, and not a valid HTTP/1.1 request.
    let mut s = TcpStream::connect(hg.listeners[0]).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n").unwrap();
    let mut raw = Raw { s, buf: Vec::new(), eof: false };
    assert!(raw.closed_within(WITHIN), "a bad preface closes the connection");
    // A preface that stops half way is held to header_read_timeout.
    let mut s = TcpStream::connect(hg.listeners[0]).unwrap();
    s.write_all(&PREFACE[..10]).unwrap();
    let t0 = Instant::now();
    let mut raw = Raw { s, buf: Vec::new(), eof: false };
    assert!(raw.closed_within(WITHIN), "a stalled preface is closed");
    assert!(t0.elapsed() >= Duration::from_millis(900), "not before header_read_timeout");
    // The preface followed by garbage instead of SETTINGS: a connection error.
    let mut s = TcpStream::connect(hg.listeners[0]).unwrap();
    s.write_all(PREFACE).unwrap();
    s.write_all(&frame(PING, 0, 0, &[0; 3])).unwrap();
    let mut raw = Raw { s, buf: Vec::new(), eof: false };
    assert!(raw.closed_within(WITHIN), "a malformed first frame ends the connection");
    still_serving(&hg);
}

#[test]
fn drain_sends_a_graceful_goaway_after_the_delay_and_closes_an_idle_connection() {
    let app = App::start();
    let db = always_up();
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\ndrain:\n  delay: 1s\n  timeout: 10s\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\ndependencies:\n  - name: db\n    type: tcp\n    address: \"{db}\"\n    interval: 100ms\n    rise: 1\n",
        app.addr
    );
    let mut hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    let mut c = Raw::open(hg.listeners[0]);
    c.handshake();
    c.s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &get_block("/before"))).unwrap();
    c.next_frame(WITHIN, |f| f.stream == 1 && f.ty == HEADERS).expect("served before the drain");
    let t0 = Instant::now();
    hg.signal("TERM");
    let goaway = c.next_frame(WITHIN, |f| f.ty == GOAWAY).expect("GOAWAY");
    assert!(t0.elapsed() >= Duration::from_millis(900), "not before drain.delay: {:?}", t0.elapsed());
    assert_eq!(goaway.code(), 0, "NO_ERROR: a graceful GOAWAY");
    assert!(c.closed_within(WITHIN), "an idle connection closes after its GOAWAY");
    assert!(hg.wait_exit(WITHIN).success());
}

#[test]
fn with_http2_off_the_preface_is_not_answered_in_http2() {
    let app = App::start();
    let hg = start(&app, "    http2: false\n");
    let mut c = Raw::open(hg.listeners[0]);
    let settings = c.next_frame(Duration::from_secs(3), |f| f.ty == SETTINGS);
    assert!(settings.is_none(), "no HTTP/2 SETTINGS from a listener with http2: false");
    assert!(c.closed_within(WITHIN), "the preface is a bad HTTP/1.1 request: closed");
    still_serving(&hg);
}
