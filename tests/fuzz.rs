//! Bounded property-based fuzzing (proptest) of the two inputs healthgate
//! takes from outside: the config file and client bytes.
//!
//! * Config loader: arbitrary YAML-ish text and mutations of real configs
//!   never panic; the result is a config or a list of problems, each with a
//!   message and a line and column.
//! * Request path: arbitrary bytes and mutated requests sent to a running
//!   healthgate (data plane and admin port) never crash it; whatever comes
//!   back is a well-formed HTTP/1.1 response (or nothing), and the process
//!   still serves afterwards.
//!
//! CI runs a few cases (`HG_FUZZ_CASES`, default 64 each); `scripts/fuzz.sh`
//! runs many more. Failures are not persisted to files: the seed and the
//! minimal input are in the failure message.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use healthgate::config::{Config, ConfigError};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use support::app::App;
use support::healthgate::Healthgate;

const WITHIN: Duration = Duration::from_secs(10);

/// Cases per property: `HG_FUZZ_CASES` (default 64, a few seconds).
fn cases() -> u32 {
    std::env::var("HG_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

fn runner() -> TestRunner {
    TestRunner::new(PropConfig { cases: cases(), failure_persistence: None, ..PropConfig::default() })
}

// === config loader ===

/// Configs to mutate: the shipped example and one using most keys.
const SEEDS: &[&str] = &[
    include_str!("../config.yaml"),
    r#"workers: 1
admin:
  listen: 127.0.0.1:0
  ready_when_degraded: false
  liveness_stall: 5s
drain: {delay: 1s, timeout: 2s}
short_circuit:
  retry_after: 3s
  expose_dependencies: true
listeners:
  - name: web
    listen: 127.0.0.1:0
    upstream: app:8080
    needs: [db]
    bypass: ["/healthz", "/metrics"]
    header_read_timeout: 2s
    max_body_bytes: 1048576
    routes:
      - name: cart
        match: {path_prefix: /cart, methods: [GET, POST], headers: [{name: x-canary, value: "1"}]}
        needs: [cache]
        short_circuit: {expose_dependencies: false}
  - name: l4
    protocol: tcp
    listen: 127.0.0.1:0
    upstream: "[::1]:5432"
    reject: reset
    on_outage: close_existing
dependencies:
  - name: db
    type: mysql
    address: db:3306
    user: app
    password_env: DB_PASSWORD
    galera: true
  - name: cache
    type: redis
    sentinel: {addresses: ["s1:26379", "s2:26379"], master_name: mymaster}
    impact: degraded
  - name: api
    type: http
    url: http://api:8080/health
    expect_status: [200, 204]
    expect_body: ok
  - name: q
    type: amqp
    urls: ["amqp://guest@r1:5672/", "amqp://guest@r2:5672/"]
    require: quorum
    queues: [orders]
  - name: raw
    type: tcp
    address: "10.0.0.1:25"
    send: "EHLO x\r\n"
    expect: "250"
    interval: 500ms
    jitter: 0.5
"#,
];

/// One edit of a config text.
#[derive(Debug, Clone)]
enum Edit {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Indent { line: usize, by: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    // Inserted text leans towards YAML syntax and the config's own words.
    let words = prop::sample::select(vec![
        ":",
        "- ",
        "\n",
        "  ",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "'",
        "#",
        "&a",
        "*a",
        "!!str",
        "|",
        ">",
        "~",
        "null",
        "0",
        "-1",
        "1e99",
        "99999999999999999999",
        "0x10",
        "1s",
        "0s",
        "500ms",
        "365d",
        "366d",
        "1h",
        "true",
        "yes",
        "name",
        "type",
        "tcp",
        "http",
        "mysql",
        "postgres",
        "application_name",
        "redis",
        "amqp",
        "listen",
        "upstream",
        "needs",
        "all",
        "routes",
        "interval",
        "timeout",
        "rise",
        "fall",
        "jitter",
        "workers",
        "drain",
        "listeners",
        "dependencies",
        "\t",
        "\u{feff}",
        "é",
        "127.0.0.1:0",
        "[::1]:0",
        "host:99999",
        "http://",
        "amqps://",
        "<<: *a",
    ]);
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), prop::collection::vec(words, 1..4)).prop_map(|(at, w)| Edit::Insert { at, text: w.concat() }),
        (any::<usize>(), "[ -~]{0,12}").prop_map(|(at, text)| Edit::Insert { at, text }),
        any::<usize>().prop_map(|line| Edit::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines { a, b }),
        (any::<usize>(), 0usize..6).prop_map(|(line, by)| Edit::Indent { line, by }),
    ]
}

/// Applies `e` to `text` (positions taken modulo the length, on char boundaries).
fn apply(text: &str, e: &Edit) -> String {
    let boundary = |at: usize| {
        let mut i = at % (text.len() + 1);
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let mut lines: Vec<&str> = text.split('\n').collect();
    let n = lines.len();
    match e {
        Edit::Delete { at, len } => {
            let a = boundary(*at);
            let b = boundary(a + len).max(a);
            format!("{}{}", &text[..a], &text[b..])
        }
        Edit::Insert { at, text: t } => {
            let a = boundary(*at);
            format!("{}{t}{}", &text[..a], &text[a..])
        }
        Edit::DuplicateLine { line } => {
            lines.insert(line % n, lines[line % n]);
            lines.join("\n")
        }
        Edit::SwapLines { a, b } => {
            lines.swap(a % n, b % n);
            lines.join("\n")
        }
        Edit::Indent { line, by } => {
            let mut owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            owned[line % n] = format!("{}{}", " ".repeat(*by), owned[line % n]);
            owned.join("\n")
        }
    }
}

/// The loader's contract for any input.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    match Config::from_yaml(text, Path::new("fuzz.yaml")) {
        Ok(_) => Ok(()),
        Err(ConfigError::Invalid { problems, .. }) => {
            prop_assert!(!problems.is_empty(), "an error without problems");
            for p in &problems {
                prop_assert!(!p.message.trim().is_empty(), "a problem without a message: {p:?}");
                prop_assert!(p.line >= 1 && p.column >= 1, "a problem without a position: {p:?}\n--- input:\n{text}");
            }
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!("unexpected error kind: {e}"))),
    }
}

#[test]
fn the_seed_configs_are_valid() {
    // Mutations start from valid configs, so they reach validation, not just the YAML parser.
    for seed in SEEDS {
        if let Err(e) = Config::from_yaml(seed, Path::new("seed.yaml")) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_config_loader_never_panics_on_mutated_configs() {
    let strategy = (prop::sample::select(SEEDS.to_vec()), prop::collection::vec(edit(), 1..6));
    runner()
        .run(&strategy, |(seed, edits)| {
            let text = edits.iter().fold(seed.to_string(), |t, e| apply(&t, e));
            check_config(&text)
        })
        .unwrap();
}

#[test]
fn the_config_loader_never_panics_on_arbitrary_text() {
    runner().run(&"(?s).{0,300}", |text| check_config(&text)).unwrap();
}

// === request path ===

/// A healthgate in service in front of a test app, for one request fuzzer.
/// Owned by the test (not a static), so it is killed when the test ends.
fn target() -> (Healthgate, App) {
    let app = App::start();
    let dep = TcpListener::bind("127.0.0.1:0").unwrap();
    let dep_addr = dep.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in dep.incoming() {
            drop(s);
        }
    });
    let cfg = format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\n    header_read_timeout: 2s\n    max_body_bytes: 4096\n    routes:\n      - name: r\n        match: {{path_prefix: /r}}\n        needs: [db]\n    bypass: [\"/b\"]\n\
         dependencies:\n  - name: db\n    type: tcp\n    address: \"{dep_addr}\"\n    interval: 100ms\n    rise: 1\n",
        app.addr
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    (hg, app)
}

/// Sends `raw` and reads until the close: the bytes that came back.
///
/// Input with a complete head gets 100 ms to be answered before the write
/// side is closed, because hyper drops a request whose client half-closes
/// (as nginx does); anything else is half-closed at once so that an
/// unfinished head ends now rather than at `header_read_timeout`.
fn send(addr: SocketAddr, raw: &[u8]) -> Result<Vec<u8>, TestCaseError> {
    let mut s = TcpStream::connect_timeout(&addr, WITHIN).map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
    // The peer may close (and reset) before everything is written.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut half_closed = !raw.windows(4).any(|w| w == b"\r\n\r\n");
    if half_closed {
        let _ = s.shutdown(Shutdown::Write);
    }
    s.set_read_timeout(Some(if half_closed { WITHIN } else { Duration::from_millis(100) })).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(out),
            Err(e) if !half_closed && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                half_closed = true;
                let _ = s.shutdown(Shutdown::Write);
                s.set_read_timeout(Some(WITHIN)).unwrap();
            }
            Err(e) => return Err(TestCaseError::fail(format!("no close within {WITHIN:?}: {e}"))),
        }
    }
}

/// Every response in `out` is well-formed: a status line, header lines,
/// and a body framed by its Content-Length (our answers and the app's
/// carry one) or chunked.
fn well_formed(mut out: &[u8]) -> Result<usize, String> {
    let mut responses = 0;
    while !out.is_empty() {
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").ok_or("a response head without its end")?;
        let head = std::str::from_utf8(&out[..end]).map_err(|_| "a non-UTF-8 response head")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status: u16 = status_line
            .strip_prefix("HTTP/1.1 ")
            // hyper answers an HTTP/1.0 request in kind.
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .ok_or(format!("bad status line {status_line:?}"))?;
        if !(100..600).contains(&status) {
            return Err(format!("status {status}"));
        }
        let mut length = None;
        let mut chunked = false;
        for l in lines {
            let (k, v) = l.split_once(": ").ok_or(format!("bad header line {l:?}"))?;
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(format!("bad header name {k:?}"));
            }
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().map_err(|_| format!("bad content-length {v:?}"))?);
            }
            chunked |= k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked");
        }
        out = &out[end + 4..];
        if chunked {
            let end = out.windows(5).position(|w| w == b"0\r\n\r\n").ok_or("a truncated chunked body")?;
            out = &out[end + 5..];
        } else if status >= 200 && status != 204 && status != 304 {
            let n = length.ok_or(format!("{status} without a length"))?;
            if out.len() < n {
                return Err(format!("a truncated body: {} of {n} bytes", out.len()));
            }
            out = &out[n..];
        }
        responses += 1;
    }
    Ok(responses)
}

/// Responses seen by status class (index 0: none), for the run's summary.
type Seen = [AtomicUsize; 6];

fn summary(what: &str, seen: &Seen) {
    let n: Vec<usize> = seen.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    println!(
        "{what}: {} cases; first responses: none {}, 1xx {}, 2xx {}, 3xx {}, 4xx {}, 5xx {}",
        cases(),
        n[0],
        n[1],
        n[2],
        n[3],
        n[4],
        n[5]
    );
}

fn check_request(hg: &Healthgate, seen: &Seen, raw: &[u8]) -> Result<(), TestCaseError> {
    for addr in [hg.listeners[0], hg.admin] {
        let out = send(addr, raw)?;
        let class =
            out.get(9).filter(|_| out.starts_with(b"HTTP/1.")).map_or(0, |c| (c.wrapping_sub(b'0')).min(5) as usize);
        seen[class].fetch_add(1, Ordering::SeqCst);
        if let Err(e) = well_formed(&out) {
            return Err(TestCaseError::fail(format!(
                "{e}\n--- sent to {addr}: {:?}\n--- got: {:?}",
                String::from_utf8_lossy(raw),
                String::from_utf8_lossy(&out)
            )));
        }
    }
    Ok(())
}

/// The process is up and serving after a fuzz run.
fn still_serving(hg: &Healthgate) {
    assert_eq!(hg.admin_get("/livez").0, 200);
    let (status, body) = support::healthgate::http_get(hg.listeners[0], "/after-fuzz");
    assert_eq!((status, body.as_str()), (200, "app:GET /after-fuzz"));
}

/// Valid requests to mutate.
const REQUESTS: &[&[u8]] = &[
    b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"POST /r/up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"GET /r/1?q=1 HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /status HTTP/1.0\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: h\r\nAccept: application/openmetrics-text\r\n\r\n",
];

#[test]
fn arbitrary_bytes_never_crash_the_request_path() {
    let (hg, _app) = target();
    let seen = Seen::default();
    runner().run(&prop::collection::vec(any::<u8>(), 0..600), |raw| check_request(&hg, &seen, &raw)).unwrap();
    summary("arbitrary bytes", &seen);
    still_serving(&hg);
}

#[test]
fn mutated_requests_get_well_formed_answers() {
    let (hg, _app) = target();
    let seen = Seen::default();
    // Edits: (position, delete length, inserted bytes) applied in turn.
    let strategy = (
        prop::sample::select(REQUESTS.to_vec()),
        prop::collection::vec(
            (
                any::<usize>(),
                0usize..8,
                prop::collection::vec(prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n'), Just(b':')], 0..8),
            ),
            1..5,
        ),
    );
    runner()
        .run(&strategy, |(seed, edits)| {
            let mut raw = seed.to_vec();
            for (at, del, ins) in edits {
                let at = at % (raw.len() + 1);
                let end = (at + del).min(raw.len());
                raw.splice(at..end, ins);
            }
            check_request(&hg, &seen, &raw)
        })
        .unwrap();
    summary("mutated requests", &seen);
    still_serving(&hg);
}
