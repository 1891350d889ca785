//! HTTP/1.1 differential suite: every case of `tests/differential/cases.txt`
//! runs through healthgate (the real binary, one `protocol: http` listener,
//! defaults) and through HAProxy 2.6 (`mode http`, default keep-alive), each
//! in front of its own instance of the same recording app, on fresh
//! connections. What the client saw (status lines including 1xx, response
//! framing and body, whether the connection stays usable) and what the app
//! received (method, target, framing headers, body, request count) are
//! compared aspect by aspect.
//!
//! A case passes when both agree, when exactly the aspects its `differs:`
//! names differ (with a `reason:` citing RFC 9110/9112), or when it is tagged
//! as a known healthgate defect. It fails on an unexplained difference, on a
//! stale explanation or defect tag (the difference is gone), and on any
//! changed body of a message both proxies relayed, which no reason can excuse.
//!
//! `DIFFERENTIAL_RESULTS=path` writes every outcome as JSON (rendered into
//! docs/http-differential.md by scripts/differential.sh);
//! `DIFFERENTIAL_FILTER=text` runs only the cases whose name contains it.

mod support;

#[path = "differential/corpus.rs"]
mod corpus;
#[path = "differential/recorder.rs"]
mod recorder;
#[path = "differential/wire.rs"]
mod wire;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use corpus::{Case, ClientStep};
use recorder::{Received, Recorder};
use serde::Serialize;
use support::healthgate::Healthgate;
use wire::Parse;

/// Quiet time after which a response that cannot be delimited is taken as complete.
const QUIET: Duration = Duration::from_millis(400);
/// Idle time before the keep-alive probe: a connection that is going to be
/// closed soon after a response is closed by then.
const SETTLE: Duration = Duration::from_millis(300);
/// Longest a case's exchange may take.
const CASE_DEADLINE: Duration = Duration::from_secs(8);
/// The keep-alive probe; the app answers it `200 probe` and does not record it.
const PROBE: &[u8] = b"GET /__probe HTTP/1.1\r\nHost: probe\r\n\r\n";

/// A response as the client saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Resp {
    /// `HTTP/1.1 200` (version and code; the reason phrase is not compared).
    status: String,
    /// `app` when the app's script can send this code, else `proxy` (only its code is compared).
    origin: &'static str,
    /// Body framing.
    framing: String,
    /// Body (chunked decoded), lossy text.
    body: String,
    /// `Connection` tokens that matter to the client: close, keep-alive, upgrade.
    connection: Vec<String>,
    /// `Content-Length` and `Transfer-Encoding` fields as sent (values lowercased).
    length_fields: Vec<String>,
}

/// What the client saw on one connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct ClientObs {
    responses: Vec<Resp>,
    /// Bytes that did not parse as a response, or came after a 101.
    other: String,
    /// `open` (the probe was answered by the app), `closed`, or what else happened.
    persistence: String,
}

/// One run of a case through one proxy.
#[derive(Debug, Clone, Serialize)]
struct Run {
    client: ClientObs,
    app: Vec<Received>,
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    fn fill(&mut self, wait: Duration) -> bool {
        support::read_some(&mut self.stream, &mut self.buf, &mut self.eof, wait)
    }
}

/// Parses every response in `buf`; returns them, the finals count, the leftover text and whether a 101 was seen.
fn responses(buf: &[u8], methods: &[String], eof: bool, app_codes: &BTreeSet<u16>) -> (Vec<Resp>, usize, String, bool) {
    let mut out = Vec::new();
    let mut finals = 0;
    let mut at = 0;
    while at < buf.len() {
        let method = methods.get(finals).or(methods.last()).map(String::as_str).unwrap_or("GET");
        match wire::parse_response(&buf[at..], method, eof) {
            Parse::Done(r, used) => {
                at += used;
                let origin = if app_codes.contains(&r.status) { "app" } else { "proxy" };
                let connection = r
                    .head
                    .tokens("connection")
                    .into_iter()
                    .filter(|t| ["close", "keep-alive", "upgrade"].contains(&t.as_str()))
                    .collect();
                out.push(Resp {
                    status: format!("{} {}", r.version, r.status),
                    origin,
                    framing: r.framing.name(),
                    body: String::from_utf8_lossy(&r.body).into_owned(),
                    connection,
                    length_fields: r
                        .head
                        .headers
                        .iter()
                        .filter(|(n, _)| n == "content-length" || n == "transfer-encoding")
                        .map(|(n, v)| format!("{n}: {}", v.to_ascii_lowercase()))
                        .collect(),
                });
                if r.status == 101 {
                    return (out, finals, format!("after 101: {}", String::from_utf8_lossy(&buf[at..])), true);
                }
                if r.status >= 200 {
                    finals += 1;
                }
            }
            Parse::Partial => return (out, finals, incomplete(&buf[at..]), false),
            Parse::Bad(e) => return (out, finals, format!("{e}: {:?}", String::from_utf8_lossy(&buf[at..])), false),
        }
    }
    (out, finals, String::new(), false)
}

/// Describes a response cut short: its status and framing and the body bytes
/// that arrived (not the head's bytes, which differ between proxies).
fn incomplete(rest: &[u8]) -> String {
    match wire::parse_head(rest) {
        Parse::Done(h, len) => {
            let framing =
                wire::response_framing(h.start.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), "GET", &h)
                    .map(|f| f.name())
                    .unwrap_or_else(|e| e.to_string());
            format!(
                "incomplete {} ({framing}) after {:?}",
                h.start.split(' ').take(2).collect::<Vec<_>>().join(" "),
                String::from_utf8_lossy(&rest[len..])
            )
        }
        _ => format!("incomplete head {:?}", String::from_utf8_lossy(rest)),
    }
}

/// Runs `case` against the proxy at `addr` whose app is `app`.
fn run(addr: SocketAddr, case: &Case, app: &Recorder) -> Run {
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, support::STEP).expect("connect to proxy");
    let _ = stream.set_nodelay(true);
    let mut c = Client { stream, buf: Vec::new(), eof: false };
    let (mut half_closed, mut closed) = (false, false);
    let mut last_status = 0u16;
    let mut awaited = 0usize;
    for step in &case.client {
        match step {
            ClientStep::Send(b) => {
                let _ = c.stream.write_all(b);
            }
            ClientStep::Pause(ms) => std::thread::sleep(Duration::from_millis(*ms)),
            ClientStep::AwaitHead => {
                let deadline = Instant::now() + Duration::from_secs(2);
                last_status = 0;
                loop {
                    if let Parse::Done(h, used) = wire::parse_head(&c.buf[awaited..]) {
                        last_status = h.start.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                        awaited += used;
                        break;
                    }
                    if Instant::now() >= deadline || (!c.fill(deadline - Instant::now()) && c.eof) {
                        break;
                    }
                }
            }
            ClientStep::SendIf(code, b) => {
                if last_status == *code {
                    let _ = c.stream.write_all(b);
                }
            }
            ClientStep::Shutdown => {
                let _ = c.stream.shutdown(Shutdown::Write);
                half_closed = true;
            }
            ClientStep::Close => {
                let _ = c.stream.shutdown(Shutdown::Both);
                closed = true;
                break;
            }
        }
    }
    let (methods, clean) = wire::request_methods(&case.client_bytes());
    let codes = case.app_statuses();
    if !closed {
        // Read until every request has a final response, the peer closes, or it is quiet.
        let deadline = start + CASE_DEADLINE;
        loop {
            let (_, finals, _, upgraded) = responses(&c.buf, &methods, c.eof, &codes);
            if c.eof || (clean && !upgraded && finals >= methods.len()) || Instant::now() >= deadline {
                break;
            }
            if !c.fill(QUIET) && !c.eof {
                break;
            }
        }
    }
    // Settle: late bytes (a replayed response) and a close that follows the response show up now.
    let settle_end = Instant::now() + SETTLE;
    while !closed && Instant::now() < settle_end && c.fill(settle_end - Instant::now()) {}
    if closed {
        std::thread::sleep(SETTLE);
    }
    let received = app.received();
    let (resps, _, other, upgraded) = responses(&c.buf, &methods, c.eof, &codes);
    let persistence = if closed {
        "client closed".to_string()
    } else if c.eof {
        "closed".to_string()
    } else if upgraded {
        "upgraded (open)".to_string()
    } else if half_closed {
        "open after half-close".to_string()
    } else {
        let _ = c.stream.write_all(PROBE);
        let before = c.buf.len();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match wire::parse_response(&c.buf[before..], "GET", c.eof) {
                Parse::Done(r, _) if r.status == 200 && r.body == b"probe" => break "open".to_string(),
                Parse::Done(r, _) => break format!("probe answered {}", r.status),
                _ if c.eof && c.buf.len() == before => break "closed".to_string(),
                _ if c.eof => break "probe answer unreadable".to_string(),
                _ => {}
            }
            if Instant::now() >= deadline {
                break "probe unanswered".to_string();
            }
            c.fill(deadline - Instant::now());
        }
    };
    Run { client: ClientObs { responses: resps, other, persistence }, app: received }
}

/// The aspects in which two runs differ, and whether a relayed body was changed.
fn compare(hg: &Run, hap: &Run) -> (BTreeSet<String>, Option<String>) {
    let mut d = BTreeSet::new();
    let statuses = |r: &Run| r.client.responses.iter().map(|x| x.status.clone()).collect::<Vec<_>>();
    if statuses(hg) != statuses(hap) {
        d.insert("status".to_string());
    }
    let framing = |r: &Run| {
        let mut v: Vec<String> = r
            .client
            .responses
            .iter()
            .map(|x| {
                if x.origin == "app" {
                    format!("{}|{:?}|{:?}|{:?}", x.framing, x.body, x.connection, x.length_fields)
                } else {
                    "proxy".into()
                }
            })
            .collect();
        v.push(r.client.other.clone());
        v
    };
    if framing(hg) != framing(hap) {
        d.insert("framing".to_string());
    }
    if hg.client.persistence != hap.client.persistence {
        d.insert("conn".to_string());
    }
    if hg.app != hap.app {
        d.insert("app".to_string());
    }
    let mut altered = None;
    for (a, b) in hg.app.iter().zip(&hap.app) {
        let complete =
            |r: &Received| !r.framing.starts_with("incomplete") && r.framing != "not read" && r.framing != "pending";
        if a.method == b.method && a.target == b.target && complete(a) && complete(b) && a.body != b.body {
            altered =
                Some(format!("the app received body {:?} through healthgate, {:?} through HAProxy", a.body, b.body));
        }
    }
    for (a, b) in hg.client.responses.iter().zip(&hap.client.responses) {
        if a.origin == "app" && a.status == b.status && a.body != b.body {
            altered =
                Some(format!("the client received body {:?} through healthgate, {:?} through HAProxy", a.body, b.body));
        }
    }
    (d, altered)
}

/// The outcome of one case.
#[derive(Debug, Serialize)]
struct Outcome {
    name: String,
    note: String,
    /// same, explained, known-defect, unexplained, stale, stale-defect, altered.
    verdict: String,
    differing: Vec<String>,
    reason: String,
    defect: Option<String>,
    detail: String,
    healthgate: Run,
    haproxy: Run,
}

impl Outcome {
    fn failed(&self) -> bool {
        matches!(self.verdict.as_str(), "unexplained" | "stale" | "stale-defect" | "altered")
    }
}

fn judge(case: &Case, hg: Run, hap: Run) -> Outcome {
    let (d, altered) = compare(&hg, &hap);
    let (verdict, detail) = if let Some(defect) = &case.defect {
        if d.is_empty() {
            ("stale-defect", format!("tagged as known defect {defect} but both agree now: remove the tag"))
        } else {
            ("known-defect", String::new())
        }
    } else if let Some(a) = altered {
        ("altered", a)
    } else if d.is_empty() && case.differs.is_empty() {
        ("same", String::new())
    } else if d == case.differs {
        ("explained", String::new())
    } else if d.is_empty() {
        ("stale", format!("explained as differing in {:?} but both agree now", case.differs))
    } else {
        let extra: Vec<_> = d.difference(&case.differs).cloned().collect();
        let gone: Vec<_> = case.differs.difference(&d).cloned().collect();
        if extra.is_empty() {
            ("stale", format!("explained aspects that no longer differ: {gone:?}"))
        } else {
            ("unexplained", format!("unexplained aspects: {extra:?}; explained but agreeing: {gone:?}"))
        }
    };
    Outcome {
        name: case.name.clone(),
        note: case.note.clone(),
        verdict: verdict.to_string(),
        differing: d.into_iter().collect(),
        reason: case.reason.clone(),
        defect: case.defect.clone(),
        detail,
        healthgate: hg,
        haproxy: hap,
    }
}

/// A running HAProxy; killed on drop.
struct Haproxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy_binary() -> String {
    for p in ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    "haproxy".to_string()
}

/// Starts HAProxy in front of `app` on a free loopback port (retried if the port was taken meanwhile).
fn start_haproxy(app: SocketAddr) -> Haproxy {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = support::free_port();
        let cfg = format!(
            "global\n    nbthread 1\n    maxconn 1000\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 10s\n    timeout server 5s\n    \
             timeout http-request 5s\n    timeout http-keep-alive 10s\n    timeout tunnel 10s\n\
             frontend fe\n    bind 127.0.0.1:{port}\n    default_backend app\n\
             backend app\n    server app {app}\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let mut child = Command::new(haproxy_binary())
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy (installed by scripts/test.sh)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Haproxy { child, addr, _dir: dir };
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "haproxy did not listen: {}",
                    std::fs::read_to_string(dir.path().join("haproxy.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("haproxy could not bind a free port");
}

/// One pair of proxies, each with its own recording app; cases run one at a time per lane.
struct Lane {
    hg_app: Recorder,
    hap_app: Recorder,
    hg: Healthgate,
    hap: Haproxy,
}

fn lane() -> Lane {
    let hg_app = Recorder::start();
    let hap_app = Recorder::start();
    let cfg = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    protocol: http\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\n",
        hg_app.addr
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", Duration::from_secs(10));
    let hap = start_haproxy(hap_app.addr);
    Lane { hg_app, hap_app, hg, hap }
}

#[test]
fn every_case_matches_haproxy_or_its_difference_is_explained() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/differential/cases.txt")).unwrap();
    let mut cases = corpus::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(cases.len() >= 200, "the corpus has {} cases, fewer than 200", cases.len());
    if let Ok(f) = std::env::var("DIFFERENTIAL_FILTER") {
        cases.retain(|c| c.name.contains(&f));
    }
    let lanes: usize = std::env::var("DIFFERENTIAL_LANES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..lanes.min(cases.len()).max(1) {
            s.spawn(|| {
                let lane = lane();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(case) = cases.get(i) else { break };
                    lane.hg_app.begin(&case.replies);
                    lane.hap_app.begin(&case.replies);
                    let (hap_addr, hap_app) = (lane.hap.addr, &lane.hap_app);
                    let (hg_run, hap_run) = std::thread::scope(|s2| {
                        let h = s2.spawn(move || run(hap_addr, case, hap_app));
                        let hg_run = run(lane.hg.listeners[0], case, &lane.hg_app);
                        (hg_run, h.join().expect("haproxy run"))
                    });
                    // Every case starts without pooled upstream connections, on both sides.
                    std::thread::scope(|s2| {
                        s2.spawn(|| lane.hg_app.close_all());
                        lane.hap_app.close_all();
                    });
                    let outcome = judge(case, hg_run, hap_run);
                    outcomes.lock().unwrap().push((i, outcome));
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap();
    outcomes.sort_by_key(|(i, _)| *i);
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|(_, o)| o).collect();
    let count = |v: &str| outcomes.iter().filter(|o| o.verdict == v).count();
    let summary = format!(
        "{} cases in {:.1?}: {} same, {} different ({} explained, {} known defect, {} failing)",
        outcomes.len(),
        started.elapsed(),
        count("same"),
        outcomes.len() - count("same"),
        count("explained"),
        count("known-defect"),
        outcomes.iter().filter(|o| o.failed()).count()
    );
    eprintln!("{summary}");
    if let Ok(path) = std::env::var("DIFFERENTIAL_RESULTS") {
        let doc = serde_json::json!({ "summary": summary, "cases": outcomes });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    }
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|o| o.failed())
        .map(|o| {
            format!(
                "{} [{}] {}\n  healthgate: {}\n  haproxy:    {}",
                o.name,
                o.verdict,
                o.detail,
                serde_json::to_string(&o.healthgate).unwrap(),
                serde_json::to_string(&o.haproxy).unwrap()
            )
        })
        .collect();
    assert!(failures.is_empty(), "{summary}\n{}", failures.join("\n"));
}
