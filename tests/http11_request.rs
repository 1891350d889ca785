//! HTTP/1.1 request-side correctness through the real binary, with raw
//! client sockets and the differential suite's recording app: refused
//! upgrades, `Upgrade` in HTTP/1.0, `Expect: 100-continue` decided by the
//! app, `Host` for HTTP/1.0, clients gone mid-request, absolute-form targets,
//! and admission on the normalized path.

mod support;

#[path = "differential/corpus.rs"]
#[allow(dead_code)]
mod corpus;
#[path = "differential/recorder.rs"]
#[allow(dead_code)]
mod recorder;
#[path = "differential/wire.rs"]
#[allow(dead_code)]
mod wire;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use recorder::{Received, Recorder};
use support::healthgate::Healthgate;
use wire::Parse;

const WITHIN: Duration = Duration::from_secs(10);

/// healthgate in front of `upstream`, with extra listener keys and, when
/// `dep` is given, one critical TCP dependency there; waits for `state`.
fn start(upstream: SocketAddr, listener_extra: &str, dep: Option<SocketAddr>, state: &str) -> Healthgate {
    let deps = dep.map_or(String::new(), |d| {
        format!(
            "dependencies:\n  - name: db\n    type: tcp\n    address: \"{d}\"\n    interval: 100ms\n    timeout: 1s\n    rise: 1\n    fall: 1\n"
        )
    });
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{upstream}\"\n{listener_extra}{deps}"
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state(state, WITHIN);
    hg
}

/// A recording app scripted with the corpus syntax (`app:` lines etc.).
fn app(script: &str) -> Recorder {
    let cases = corpus::parse(&format!("[script]\nclient: x\n{script}")).expect("app script");
    let r = Recorder::start();
    r.begin(&cases[0].replies);
    r
}

/// A raw client connection.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, support::STEP).expect("connect");
        s.set_nodelay(true).unwrap();
        Client { s, buf: Vec::new(), eof: false }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Reads once, up to `until`; false on EOF or timeout.
    fn fill(&mut self, until: Instant) -> bool {
        support::read_some(&mut self.s, &mut self.buf, &mut self.eof, until.saturating_duration_since(Instant::now()))
    }

    /// The next response (1xx included) to a `method` request: (status, head text, body).
    fn response(&mut self, method: &str) -> (u16, String, Vec<u8>) {
        let until = Instant::now() + support::STEP;
        loop {
            if let Parse::Done(r, used) = wire::parse_response(&self.buf, method, self.eof) {
                let head = String::from_utf8_lossy(&self.buf[..used]).into_owned();
                self.buf.drain(..used);
                return (r.status, head, r.body);
            }
            if self.eof || Instant::now() >= until {
                panic!("no response within {:?}; got {:?}", support::STEP, String::from_utf8_lossy(&self.buf));
            }
            self.fill(until);
        }
    }

    /// Whether healthgate closes the connection within `within` with nothing more sent.
    fn closed_within(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while !self.eof && Instant::now() < until {
            self.fill(until);
        }
        self.eof && self.buf.is_empty()
    }
}

/// Polls `app` until its requests satisfy `done`.
fn received_when(app: &Recorder, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
    support::eventually_blocking(what, WITHIN, || {
        let r = app.received();
        done(&r).then_some(r)
    })
}

const WS: &str = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn a_refused_or_ignored_upgrade_leaves_a_usable_keep_alive_connection() {
    let app = app("app: HTTP/1.1 403 Forbidden\\r\\n\napp: Content-Length: 5\\r\\n\napp: \\r\\n\napp: nope!\n");
    let hg = start(app.addr, "", None, "in_service");
    let requests = [
        WS,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    ];
    for (i, req) in requests.iter().enumerate() {
        let mut c = Client::connect(hg.listeners[0]);
        c.send(req.as_bytes());
        let (status, head, _) = c.response("GET");
        assert_eq!(status, if i == 0 { 403 } else { 200 }, "{req}");
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
        // Idle past PARK_AFTER: the parked socket must not go to the upgrade.
        assert!(!c.closed_within(healthgate::proxy::http::PARK_AFTER * 4), "closed after {req}");
        c.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.response("GET").0, 200, "the next request after {req}");
    }
}

#[test]
fn upgrade_in_an_http10_request_is_ignored() {
    let app = app(
        "app: HTTP/1.1 101 Switching Protocols\\r\\n\napp: Connection: Upgrade\\r\\n\napp: Upgrade: websocket\\r\\n\napp: \\r\\n\napp-tunnel\n",
    );
    let hg = start(app.addr, "", None, "in_service");
    let mut c = Client::connect(hg.listeners[0]);
    c.send(WS.replace("HTTP/1.1", "HTTP/1.0").as_bytes());
    let (status, _, _) = c.response("GET");
    assert_eq!(status, 502, "a 101 to a request that asked for no upgrade is not relayed");
    let got = received_when(&app, "the request", |r| !r.is_empty());
    assert!(got[0].upgrade.is_empty(), "Upgrade reached the app: {got:?}");
}

#[test]
fn expect_100_continue_lets_the_app_refuse_before_the_body_is_sent() {
    let app = app(
        "app-early\napp: HTTP/1.1 401 Unauthorized\\r\\n\napp: Content-Length: 4\\r\\n\napp: \\r\\n\napp: nope\napp-pause: 2000\n",
    );
    let hg = start(app.addr, "", None, "in_service");
    let mut c = Client::connect(hg.listeners[0]);
    c.send(b"PUT /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 20000000\r\n\r\n");
    let (status, head, body) = c.response("PUT");
    assert_eq!(status, 401, "the app's answer comes first, not a 100 of healthgate's own: {head}");
    assert_eq!(body, b"nope");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "the unread body ends the connection: {head}");
    let got = received_when(&app, "the request", |r| !r.is_empty());
    assert_eq!(got[0].expect, vec!["100-continue".to_string()], "the expectation is forwarded");
    assert!(c.closed_within(support::STEP));
}

#[test]
fn expect_100_continue_relays_the_apps_100_and_then_the_body() {
    let app = app(
        "app-early\napp: HTTP/1.1 100 Continue\\r\\n\napp: \\r\\n\napp-await-body\napp: HTTP/1.1 200 OK\\r\\n\napp: Content-Length: 2\\r\\n\napp: \\r\\n\napp: ok\n",
    );
    let hg = start(app.addr, "", None, "in_service");
    let mut c = Client::connect(hg.listeners[0]);
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    assert_eq!(c.response("POST").0, 100);
    c.send(b"hello");
    assert_eq!(c.response("POST").0, 200);
    let got = received_when(&app, "the body", |r| r.first().is_some_and(|r| r.framing == "length 5"));
    assert_eq!(got[0].body, "hello");
}

#[test]
fn an_http10_request_without_host_reaches_the_app_with_one_and_connection_cannot_remove_host() {
    let app = app("");
    let hg = start(app.addr, "", None, "in_service");
    let mut c = Client::connect(hg.listeners[0]);
    c.send(b"GET /x HTTP/1.0\r\n\r\n");
    assert_eq!(c.response("GET").0, 200);
    let mut c = Client::connect(hg.listeners[0]);
    c.send(b"GET /y HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n");
    assert_eq!(c.response("GET").0, 200);
    let got = received_when(&app, "both requests", |r| r.len() == 2);
    assert_eq!(got[0].host, vec![app.addr.to_string()], "the upstream's authority");
    assert_eq!(got[1].host, vec!["a".to_string()]);
}

#[test]
fn a_client_gone_mid_body_cancels_the_upstream_request() {
    // A raw app that reports when its connection from healthgate ends.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    let hg = start(addr, "", None, "in_service");
    let mut c = Client::connect(hg.listeners[0]);
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc");
    // The app got the head before the client goes.
    std::thread::sleep(Duration::from_millis(200));
    drop(c);
    let got = rx.recv_timeout(support::STEP).expect("the upstream connection is closed when the client goes");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("POST /x HTTP/1.1\r\n"), "{text}");
}

#[test]
fn an_absolute_form_request_goes_to_the_configured_app_in_origin_form() {
    let app = app("");
    let hg = start(app.addr, "", None, "in_service");
    let mut c = Client::connect(hg.listeners[0]);
    c.send(b"GET http://elsewhere.test:8080/x?q=1 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.response("GET").0, 200);
    let got = received_when(&app, "the request", |r| !r.is_empty());
    assert_eq!(got[0].target, "/x?q=1");
    assert_eq!(got[0].host, vec!["elsewhere.test:8080".to_string()], "Host from the URI (RFC 9112 §3.2.2)");
}

#[test]
fn admission_and_the_app_see_the_normalized_path() {
    let app = app("");
    // A dependency that is down: nothing listens there.
    let dep = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let hg = start(app.addr, "    bypass: [\"/healthz\"]\n", Some(dep), "out_of_service");
    let status = |target: &str| {
        let mut c = Client::connect(hg.listeners[0]);
        c.send(format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        c.response("GET").0
    };
    for sneaky in [
        "/healthz/../cart",
        "/healthz/%2e%2e/cart",
        "/healthz/.%2E/cart",
        "/healthz//../cart",
        "http://a/healthz/../cart",
    ] {
        assert_eq!(status(sneaky), 503, "{sneaky} must be gated like /cart");
    }
    assert_eq!(status("/healthz%2F..%2Fcart"), 503, "an encoded slash is not a separator: no bypass");
    assert_eq!(status("/../healthz"), 400, "climbing above the root");
    for (n, (bypassed, forwarded)) in [
        ("/healthz/./live", "/healthz/live"),
        ("/%68ealthz", "/healthz"),
        ("//healthz//x?a=/../b", "/healthz/x?a=/../b"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(status(bypassed), 200, "{bypassed}");
        let got = received_when(&app, "the bypassed request", |r| r.len() == n + 1);
        assert_eq!(got[n].target, forwarded, "the app gets the path the gate decided on");
    }
}
