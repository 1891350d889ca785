//! The recording app of the differential suite: a raw TCP server that
//! records exactly what each request looked like when it arrived (method,
//! target, framing headers, body bytes) and answers with the current case's
//! scripted bytes, including misbehaviour (1xx, bad framing, closing mid-
//! response). Requests are delimited by parsing their framing; input that
//! cannot be framed is read until 150 ms of quiet and recorded as it is.
//!
//! Requests for `/__probe` (the harness's keep-alive probe) get `200 probe`
//! and are not recorded.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::corpus::{AppStep, Reply, default_reply};
use super::wire::{self, Framing, Parse};

/// Quiet time that ends input the app cannot frame.
const QUIET: Duration = Duration::from_millis(150);
/// Longest wait for the rest of a request that has started.
const BODY_WAIT: Duration = Duration::from_secs(3);

/// One request as the app received it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Protocol version.
    pub version: String,
    /// `Host` values.
    pub host: Vec<String>,
    /// `Content-Length` values.
    pub content_length: Vec<String>,
    /// `Transfer-Encoding` values.
    pub transfer_encoding: Vec<String>,
    /// `Expect` values.
    pub expect: Vec<String>,
    /// `Upgrade` values.
    pub upgrade: Vec<String>,
    /// Body framing, or why it could not be framed.
    pub framing: String,
    /// Body bytes (chunked decoded), lossy text.
    pub body: String,
    /// Bytes that arrived after a 101, lossy text.
    pub tunnel: String,
}

#[derive(Default)]
struct State {
    replies: Vec<Reply>,
    received: Vec<Received>,
    /// Every open connection, by id (registered when accepted).
    conns: HashMap<u64, TcpStream>,
    next_id: u64,
    /// Counts cases; a connection records only into the case it was accepted in,
    /// so a late request from a previous case's connection cannot pollute this one.
    generation: u64,
}

/// A running recording app.
pub struct Recorder {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Recorder {
    /// Listens on 127.0.0.1:0; a thread per connection.
    pub fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let st = st.clone();
                let (id, generation) = {
                    let mut s = st.lock().unwrap();
                    s.next_id += 1;
                    let id = s.next_id;
                    if let Ok(c) = stream.try_clone() {
                        s.conns.insert(id, c);
                    }
                    (id, s.generation)
                };
                std::thread::spawn(move || serve(stream, &st, id, generation));
            }
        });
        Recorder { addr, state }
    }

    /// Starts a case: its replies, and an empty record.
    pub fn begin(&self, replies: &[Reply]) {
        let mut s = self.state.lock().unwrap();
        s.replies = replies.to_vec();
        s.received.clear();
        s.generation += 1;
    }

    /// Half-closes every connection and waits (up to 2 s) until the proxy
    /// has closed each of them, then cuts any left; so the next case starts
    /// without pooled upstream connections and nothing of this case lingers.
    pub fn close_all(&self) {
        for s in self.state.lock().unwrap().conns.values() {
            let _ = s.shutdown(Shutdown::Write);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.state.lock().unwrap().conns.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        for s in self.state.lock().unwrap().conns.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// What the app received since [`Recorder::begin`].
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Conn {
    /// Reads once, waiting up to `wait`; false on timeout or EOF.
    fn fill(&mut self, wait: Duration) -> bool {
        crate::support::read_some(&mut self.stream, &mut self.buf, &mut self.eof, wait)
    }
}

fn record_of(head: &wire::Head, framing: String, body: &[u8]) -> Received {
    let mut words = head.start.split(' ');
    Received {
        method: words.next().unwrap_or("").to_string(),
        target: words.next().unwrap_or("").to_string(),
        version: words.next().unwrap_or("").to_string(),
        host: head.all("host"),
        content_length: head.all("content-length"),
        transfer_encoding: head.all("transfer-encoding"),
        expect: head.all("expect"),
        upgrade: head.all("upgrade"),
        framing,
        body: String::from_utf8_lossy(body).into_owned(),
        tunnel: String::new(),
    }
}

/// Reads the body of `head` (whose bytes start at `conn.buf[head.len..]`);
/// returns its record and consumes the request from the buffer. While the
/// body is incomplete, `progress` gets a record of what arrived so far, so a
/// snapshot taken meanwhile shows it.
fn read_body(conn: &mut Conn, head: &wire::Head, progress: &dyn Fn(Received)) -> Received {
    let framing = wire::request_framing(head);
    let deadline = std::time::Instant::now() + BODY_WAIT;
    loop {
        let rest = &conn.buf[head.len..];
        let done = match &framing {
            Ok(Framing::None) | Ok(Framing::Close) => Some((record_of(head, "none".into(), b""), 0)),
            Ok(Framing::Length(n)) if rest.len() as u64 >= *n => {
                Some((record_of(head, format!("length {n}"), &rest[..*n as usize]), *n as usize))
            }
            Ok(Framing::Length(_)) => None,
            Ok(Framing::Chunked) => match wire::parse_chunked(rest) {
                Parse::Done((body, _), used) => Some((record_of(head, "chunked".into(), &body), used)),
                Parse::Partial => None,
                Parse::Bad(e) => Some((record_of(head, format!("bad: {e}"), rest), rest.len())),
            },
            Err(_) => None,
        };
        if let Some((rec, used)) = done {
            conn.buf.drain(..head.len + used);
            return rec;
        }
        if let Ok(f) = &framing {
            progress(record_of(head, format!("incomplete {}", f.name()), &conn.buf[head.len..]));
        }
        let quiet_ends = framing.is_err();
        let wait = if quiet_ends { QUIET } else { deadline.saturating_duration_since(std::time::Instant::now()) };
        if !conn.fill(wait.max(Duration::from_millis(1)))
            && (quiet_ends || conn.eof || std::time::Instant::now() >= deadline)
        {
            let rest = conn.buf[head.len..].to_vec();
            let why = match &framing {
                Err(e) => format!("unframed ({e})"),
                Ok(f) => format!("incomplete {}", f.name()),
            };
            conn.buf.clear();
            return record_of(head, why, &rest);
        }
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, id: u64, generation: u64) {
    let _ = stream.set_nodelay(true);
    let mut conn = Conn { stream, buf: Vec::new(), eof: false };
    serve_requests(&mut conn, state, generation);
    let _ = conn.stream.shutdown(Shutdown::Both);
    state.lock().unwrap().conns.remove(&id);
}

fn serve_requests(conn: &mut Conn, state: &Mutex<State>, generation: u64) {
    loop {
        // The next head.
        let head = loop {
            match wire::parse_head(&conn.buf) {
                Parse::Done(h, _) => break h,
                _ if conn.eof => return,
                _ => {
                    let wait = if conn.buf.is_empty() { Duration::from_secs(3600) } else { BODY_WAIT };
                    if !conn.fill(wait) && !conn.eof && !conn.buf.is_empty() {
                        let garbled = String::from_utf8_lossy(&conn.buf).into_owned();
                        let mut st = state.lock().unwrap();
                        if st.generation == generation {
                            st.received.push(Received { framing: format!("unparsed head: {garbled:?}"), ..blank() });
                        }
                        return;
                    }
                }
            }
        };
        if head.start.split(' ').nth(1) == Some("/__probe") {
            let _ = read_body(conn, &head, &|_| {});
            if conn.stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nprobe").is_err() {
                return;
            }
            continue;
        }
        let (index, reply) = {
            let mut st = state.lock().unwrap();
            let index = st.received.len();
            let reply = st.replies.get(index).cloned().unwrap_or_else(default_reply);
            if st.generation == generation {
                st.received.push(record_of(&head, "pending".into(), b""));
            }
            (index, reply)
        };
        let store = |rec: Received| {
            let mut st = state.lock().unwrap();
            if st.generation == generation
                && let Some(slot) = st.received.get_mut(index)
            {
                *slot = rec;
            }
        };
        if !reply.early {
            store(read_body(conn, &head, &store));
        } else {
            store(record_of(&head, "not read".into(), b""));
        }
        let mut body_read = !reply.early;
        if reply.early && matches!(wire::request_framing(&head), Ok(Framing::None)) {
            store(read_body(conn, &head, &store));
            body_read = true;
        }
        for step in &reply.steps {
            match step {
                AppStep::Send(b) => {
                    if conn.stream.write_all(b).is_err() {
                        return;
                    }
                }
                AppStep::Pause(ms) => std::thread::sleep(Duration::from_millis(*ms)),
                AppStep::AwaitBody => {
                    store(read_body(conn, &head, &store));
                    body_read = true;
                }
                AppStep::Close => {
                    let _ = conn.stream.shutdown(Shutdown::Both);
                    return;
                }
                AppStep::Tunnel => {
                    if !body_read {
                        conn.buf.drain(..head.len.min(conn.buf.len()));
                    }
                    tunnel(conn, state, index, generation);
                    return;
                }
            }
        }
        if !body_read {
            // The reply did not read the body: the connection is out of sync.
            let _ = conn.stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Echoes every byte after a 101 and records it on request `index`.
fn tunnel(conn: &mut Conn, state: &Mutex<State>, index: usize, generation: u64) {
    loop {
        if !conn.buf.is_empty() {
            let data = std::mem::take(&mut conn.buf);
            let mut st = state.lock().unwrap();
            if st.generation == generation
                && let Some(r) = st.received.get_mut(index)
            {
                r.tunnel.push_str(&String::from_utf8_lossy(&data));
            }
            drop(st);
            if conn.stream.write_all(&data).is_err() {
                return;
            }
        }
        if !conn.fill(Duration::from_secs(10)) && (conn.eof || conn.buf.is_empty()) {
            return;
        }
    }
}

fn blank() -> Received {
    Received {
        method: String::new(),
        target: String::new(),
        version: String::new(),
        host: vec![],
        content_length: vec![],
        transfer_encoding: vec![],
        expect: vec![],
        upgrade: vec![],
        framing: String::new(),
        body: String::new(),
        tunnel: String::new(),
    }
}
