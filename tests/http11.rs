//! HTTP/1.1 framing through the real binary: how healthgate relays framing,
//! transfer codings, 1xx responses, HTTP/1.0 traffic and broken answers from
//! the app, and how it refuses invalid request lines. Raw client sockets; the
//! app is the differential suite's recording app (scripted replies, every
//! request recorded as it arrived), or a raw one where the whole head matters.

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

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use recorder::{Received, Recorder};
use support::healthgate::Healthgate;

/// Longest wait for any expected byte.
const WAIT: Duration = Duration::from_secs(5);

/// healthgate (defaults) in front of `app`.
fn healthgate(app: SocketAddr) -> Healthgate {
    let hg = Healthgate::start(&format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    protocol: http\n    listen: 127.0.0.1:0\n    upstream: \"{app}\"\n"
    ));
    hg.wait_state("in_service", Duration::from_secs(10));
    hg
}

/// A recording app scripted with `replies` (corpus `app:` directives).
fn recorder(replies: &str) -> Recorder {
    let case = corpus::parse(&format!("[t]\nclient: x\n{replies}")).unwrap_or_else(|e| panic!("{e}"));
    let app = Recorder::start();
    app.begin(&case[0].replies);
    app
}

/// A client connection reading into one buffer.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    fn connect(hg: &Healthgate) -> Client {
        let s = TcpStream::connect(hg.listeners[0]).unwrap();
        s.set_nodelay(true).unwrap();
        Client { s, buf: Vec::new(), eof: false }
    }

    fn send(&mut self, b: &[u8]) -> &mut Self {
        self.s.write_all(b).unwrap();
        self
    }

    /// Reads until `done` holds for what arrived (or EOF); panics after [`WAIT`].
    fn until(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = String::from_utf8_lossy(&self.buf).into_owned();
            if done(&text) {
                return text;
            }
            assert!(!self.eof, "closed before {what}: {text:?}");
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {text:?}");
            self.s.set_read_timeout(Some(deadline - Instant::now())).unwrap();
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the peer closed the connection (true) or answered a
    /// keep-alive probe on it (false), within [`WAIT`].
    fn closed(&mut self) -> bool {
        if self.eof {
            return true;
        }
        let before = self.buf.len();
        let _ = self.s.write_all(b"GET /__probe HTTP/1.1\r\nHost: a\r\n\r\n");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            self.s.set_read_timeout(Some(deadline - Instant::now())).unwrap();
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => return true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
            if String::from_utf8_lossy(&self.buf[before..]).contains("HTTP/1.") {
                return false;
            }
        }
        panic!("keep-alive probe neither answered nor refused");
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// The app's records once `n` requests arrived.
fn received(app: &Recorder, n: usize) -> Vec<Received> {
    support::eventually_blocking("the app's requests", WAIT, || {
        let r = app.received();
        (r.len() >= n && r.iter().all(|x| x.framing != "pending")).then_some(r)
    })
}

#[test]
fn a_response_with_content_length_and_chunked_is_relayed_chunked_and_whole() {
    let app = recorder(
        "app: HTTP/1.1 200 OK\\r\\n\napp: Content-Length: 5\\r\\n\napp: Transfer-Encoding: chunked\\r\\n\napp: \\r\\n\n\
         app: b\\r\\n\napp: hello world\\r\\n\napp: 0\\r\\n\napp: \\r\\n",
    );
    let hg = healthgate(app.addr);
    let mut c = Client::connect(&hg);
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let text = c.until("the whole chunked body", |t| t.ends_with("0\r\n\r\n"));
    assert!(text.contains("hello world"), "{text:?}");
    assert!(!text.to_ascii_lowercase().contains("content-length"), "the stale length is removed: {text:?}");
    assert!(!c.closed(), "the connection stays usable");
}

#[test]
fn a_get_with_a_chunked_body_is_forwarded_with_it_and_the_pipelined_request_survives() {
    let app = recorder("");
    let hg = healthgate(app.addr);
    let mut c = Client::connect(&hg);
    let body = vec![b'z'; 300 * 1024];
    let mut req =
        format!("GET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    req.extend_from_slice(b"\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\nHEAD /h HTTP/1.1\r\nHost: a\r\n");
    req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    c.send(&req);
    c.until("three responses", |t| count(t, "HTTP/1.1 200") == 3);
    let r = received(&app, 3);
    assert_eq!((r[0].method.as_str(), r[0].framing.as_str(), r[0].body.len()), ("GET", "chunked", body.len()));
    assert_eq!(r[1].target, "/next");
    assert_eq!((r[2].method.as_str(), r[2].framing.as_str(), r[2].body.as_str()), ("HEAD", "chunked", "hello"));
    assert!(!c.closed());
}

#[test]
fn transfer_codings_other_than_chunked_are_refused_never_relabelled() {
    // Refused requests never reach the app: its one reply is for the GET.
    let app = recorder(
        "app: HTTP/1.1 200 OK\\r\\n\napp: Transfer-Encoding: gzip, chunked\\r\\n\napp: \\r\\n\n\
         app: 5\\r\\n\napp: hello\\r\\n\napp: 0\\r\\n\napp: \\r\\n",
    );
    let hg = healthgate(app.addr);
    let mut c = Client::connect(&hg);
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let text = c.until("an answer", |t| t.contains("\r\n\r\n"));
    assert!(text.starts_with("HTTP/1.1 501 "), "a coding healthgate does not implement: {text:?}");
    assert!(c.closed(), "the unread body closes the connection");
    let mut c = Client::connect(&hg);
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let text = c.until("an answer", |t| t.contains("\r\n\r\n"));
    assert!(text.starts_with("HTTP/1.1 400 "), "chunked twice is invalid: {text:?}");
    assert!(app.received().is_empty(), "neither reached the app");
    let mut c = Client::connect(&hg);
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let text = c.until("an answer", |t| t.contains("\r\n\r\n"));
    assert!(text.starts_with("HTTP/1.1 502 "), "a gzip-coded response is not relabelled: {text:?}");
}

#[test]
fn informational_responses_reach_http11_clients_at_once_and_never_http10_clients() {
    let early = "app: HTTP/1.1 103 Early Hints\\r\\n\napp: Link: </s.css>; rel=preload\\r\\n\napp: \\r\\n\n\
                 app-pause: 700\napp: HTTP/1.1 200 OK\\r\\n\napp: Content-Length: 2\\r\\n\napp: \\r\\n\napp: ok\n";
    let app = recorder(&format!("{early}app-next\n{early}"));
    let hg = healthgate(app.addr);
    let mut c = Client::connect(&hg);
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let text = c.until("the 103", |t| t.contains("\r\n\r\n"));
    assert!(text.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{text:?}");
    assert!(text.contains("link: </s.css>; rel=preload\r\n"), "{text:?}");
    assert!(!text.contains("200 OK"), "the 103 came while the app still held its answer: {text:?}");
    let text = c.until("the 200", |t| t.ends_with("ok"));
    assert_eq!(count(&text, "HTTP/1.1 103"), 1);
    let mut c = Client::connect(&hg);
    c.send(b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n");
    let text = c.until("the 200", |t| t.ends_with("ok"));
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "no 1xx to an HTTP/1.0 client: {text:?}");
}

#[test]
fn a_request_is_not_replayed_once_the_app_started_answering() {
    let app = recorder(
        "app: HTTP/1.1 200 OK\\r\\n\napp: Content-Length: 2\\r\\n\napp: \\r\\n\napp: ok\napp-next\napp: HTTP/1.1 20\napp-close",
    );
    let hg = healthgate(app.addr);
    let mut c = Client::connect(&hg);
    c.send(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n");
    c.until("the first answer", |t| t.ends_with("ok"));
    // Idle past the replay threshold, so the pooled connection qualifies.
    std::thread::sleep(healthgate::proxy::http::REPLAY_AFTER_IDLE * 2);
    c.send(b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let text = c.until("the second answer", |t| count(t, "HTTP/1.1 ") == 2 && t.ends_with('}'));
    assert!(text.contains("HTTP/1.1 502 "), "{text:?}");
    // A replay would have reached the app before the 502 was sent.
    let r = received(&app, 2);
    assert_eq!(r.len(), 2, "the DELETE reached the app once: {r:?}");
}

/// A raw app answering every request head with `reply`; sends each head it read.
fn raw_app(reply: &'static [u8]) -> (SocketAddr, mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                        if s.write_all(reply).is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[test]
fn http10_messages_are_labelled_by_their_version_and_stay_persistent() {
    let (addr, heads) = raw_app(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello");
    let hg = healthgate(addr);
    let mut c = Client::connect(&hg);
    c.send(b"GET /x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n");
    let text = c.until("the answer", |t| t.ends_with("hello"));
    let head = heads.recv_timeout(WAIT).unwrap().to_ascii_lowercase();
    assert!(head.contains("via: 1.0 healthgate\r\n"), "the protocol received: {head:?}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("connection: keep-alive\r\n"), "{text:?}");
    assert!(lower.contains("via: 1.0 healthgate\r\n"), "the app answered HTTP/1.0: {text:?}");
    assert!(!c.closed(), "kept alive as announced");
    let mut c = Client::connect(&hg);
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let text = c.until("the answer", |t| t.ends_with("hello"));
    let head = heads.recv_timeout(WAIT).unwrap().to_ascii_lowercase();
    assert!(head.contains("via: 1.1 healthgate\r\n"), "{head:?}");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "healthgate's own version, persistent by default: {text:?}");
    assert!(!c.closed());
}

#[test]
fn bad_framing_before_the_body_is_a_502_and_a_repeated_length_is_sent_once() {
    let app = recorder(
        "app: HTTP/1.1 200 OK\\r\\n\napp: Transfer-Encoding: chunked\\r\\n\napp: \\r\\n\napp: fffffffffffffffff5\\r\\n\napp: hello\\r\\n\n\
         app-next\napp: HTTP/1.1 200 OK\\r\\n\napp: Transfer-Encoding: chunked\\r\\n\napp: \\r\\n\napp: 5\\n\napp: hello\\n\napp: 0\\n\napp: \\n\n\
         app-next\napp: HTTP/1.1 200 OK\\r\\n\napp: Content-Length: 2, 2\\r\\n\napp: \\r\\n\napp: ok",
    );
    let hg = healthgate(app.addr);
    for what in ["an overflowing chunk size", "LF-only chunk lines"] {
        let mut c = Client::connect(&hg);
        c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        let text = c.until("an answer", |t| t.ends_with('}'));
        assert!(text.starts_with("HTTP/1.1 502 "), "{what}: {text:?}");
        assert!(text.contains("application/problem+json"), "{what}: {text:?}");
        assert!(!c.closed(), "{what}: the request was complete, the connection stays");
    }
    let mut c = Client::connect(&hg);
    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let text = c.until("an answer", |t| t.ends_with("ok"));
    assert!(text.to_ascii_lowercase().contains("content-length: 2\r\n"), "{text:?}");
}

#[test]
fn a_request_line_over_max_header_bytes_gets_414() {
    let app = recorder("");
    let hg = healthgate(app.addr);
    let mut c = Client::connect(&hg);
    c.send(format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(20_000)).as_bytes());
    let text = c.until("an answer", |t| t.contains("\r\n\r\n"));
    assert!(text.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{text:?}");
    let mut c = Client::connect(&hg);
    c.send(format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "b".repeat(20_000)).as_bytes());
    let text = c.until("an answer", |t| t.contains("\r\n\r\n"));
    assert!(text.starts_with("HTTP/1.1 431 "), "a large header is still 431: {text:?}");
}

#[test]
fn a_target_with_a_fragment_or_non_ascii_bytes_gets_400() {
    let app = recorder("");
    let hg = healthgate(app.addr);
    for target in [&b"/x#frag"[..], b"/\xc3\xa9"] {
        let mut c = Client::connect(&hg);
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        c.send(&req);
        let text = c.until("an answer", |t| t.ends_with('}'));
        assert!(text.starts_with("HTTP/1.1 400 "), "{target:?}: {text:?}");
        assert!(c.closed());
    }
    // A `#` elsewhere in the head is not a fragment.
    let mut c = Client::connect(&hg);
    c.send(b"GET /x?a=%23 HTTP/1.1\r\nHost: a\r\nReferer: http://a/#top\r\n\r\n");
    let text = c.until("an answer", |t| t.ends_with("ok"));
    assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}");
    assert_eq!(received(&app, 1)[0].target, "/x?a=%23");
}
