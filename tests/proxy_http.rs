//! In-process tests of the HTTP data plane (`healthgate::proxy::http::serve`)
//! against a real hyper app on an ephemeral port, with raw-TCP clients so
//! every byte on the wire (keep-alive, hop-by-hop headers, upgrades) is
//! visible. Dependency states are set directly on the shared `Health`.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use healthgate::config::Config;
use healthgate::metrics::Metrics;
use healthgate::proxy::{ListenerCtx, http::serve};
use healthgate::state::{DepHealth, DepStatus, Health};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, timeout};

use support::{STEP, eventually};

/// Awaits `f` under [`STEP`], failing the test on a hang.
async fn t<F: std::future::Future>(what: &str, f: F) -> F::Output {
    timeout(STEP, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

// === the proxy under test ===

/// A running `serve` on its own thread (current-thread runtime + LocalSet,
/// as `server.rs` runs each worker).
struct Proxy {
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    drain: watch::Sender<Option<Instant>>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// One HTTP listener to `app` with extra listener keys (indented by 4) and
/// tcp dependencies `(name, impact)` (never checked: the test sets states).
fn yaml(app: SocketAddr, listener_extra: &str, deps: &[(&str, &str)]) -> String {
    let mut y = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{app}\"\n    bypass: [\"/healthz\"]\n{listener_extra}"
    );
    if !deps.is_empty() {
        y.push_str("dependencies:\n");
        for (name, impact) in deps {
            y.push_str(&format!("  - name: {name}\n    type: tcp\n    address: 127.0.0.1:1\n    impact: {impact}\n"));
        }
    }
    y
}

impl Proxy {
    fn start(yaml: &str) -> Proxy {
        let config = Config::from_yaml(yaml, Path::new("test.yaml")).expect("test config");
        let health = Health::new(&config);
        let metrics = Metrics::new(&config);
        let ctx = ListenerCtx::new(&config, 0, health.clone(), metrics.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (drain, drain_rx) = watch::channel(None);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                serve(listener, healthgate::proxy::live(ctx), drain_rx).await;
            });
            let _ = done_tx.send(());
        });
        Proxy { addr, health, metrics, drain, done: Some(done) }
    }

    /// Starts with every dependency up.
    fn in_service(yaml: &str) -> Proxy {
        let p = Proxy::start(yaml);
        for i in 0..p.health.deps().len() {
            p.set(i, DepHealth::Up);
        }
        p
    }

    fn set(&self, dep: usize, state: DepHealth) {
        self.health.publish(dep, DepStatus { state, ..DepStatus::unknown() });
    }

    async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// `healthgate_requests_total` for one outcome, summed over routes.
    fn count(&self, outcome: &str) -> u64 {
        let needle = format!("healthgate_requests_total{{listener=\"web\",outcome=\"{outcome}\",route=");
        let text = self.metrics.render_prometheus();
        text.lines()
            .filter(|l| l.starts_with(needle.as_str()))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// `healthgate_requests_total` for one outcome and route.
    fn count_route(&self, outcome: &str, route: &str) -> u64 {
        let needle = format!("healthgate_requests_total{{listener=\"web\",outcome=\"{outcome}\",route=\"{route}\"}} ");
        let text = self.metrics.render_prometheus();
        text.lines().find_map(|l| l.strip_prefix(needle.as_str())).map(|v| v.trim().parse().unwrap()).unwrap_or(0)
    }

    fn gauge_active(&self) -> i64 {
        self.gauge("healthgate_active_connections")
    }

    fn gauge_parked(&self) -> i64 {
        self.gauge("healthgate_parked_connections")
    }

    fn gauge(&self, name: &str) -> i64 {
        let text = self.metrics.render_prometheus();
        let prefix = format!("{name}{{listener=\"web\"}} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(|v| v.trim().parse().unwrap()).unwrap_or(-1)
    }

    /// Waits until `n` idle keep-alive connections are parked.
    async fn until_parked(&self, n: i64) {
        eventually("connections parked", STEP, || async { (self.gauge_parked() == n).then_some(()) }).await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.drain.send_replace(Some(Instant::now()));
    }
}

// === a raw HTTP/1.1 client ===

/// A parsed response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A client connection that reads exactly one response at a time, so
/// keep-alive reuse and closes are observable.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = t("connect", TcpStream::connect(addr)).await.expect("connect");
        Client { s, buf: Vec::new() }
    }

    async fn send(&mut self, raw: &[u8]) {
        t("write", self.s.write_all(raw)).await.expect("write");
    }

    /// Leaves with a reset (RST), as a client with unread data or a
    /// zero linger time does.
    fn reset(self) {
        socket2::SockRef::from(&self.s).set_linger(Some(Duration::ZERO)).unwrap();
    }

    async fn get(&mut self, path: &str) -> Resp {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await;
        self.response().await
    }

    /// Reads more bytes; false on EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 256 * 1024];
        let n = t("read", self.s.read(&mut chunk)).await.unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "EOF in the middle of a body");
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return l;
            }
            assert!(self.fill().await, "EOF before end of line");
        }
    }

    async fn head(&mut self) -> (u16, Vec<(String, String)>) {
        let status_line = self.line().await;
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
        let mut headers = Vec::new();
        loop {
            let l = self.line().await;
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header line");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        (status, headers)
    }

    async fn body(&mut self, headers: &[(String, String)]) -> Vec<u8> {
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        if let Some(len) = get("content-length") {
            return self.take(len.parse().unwrap()).await;
        }
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let size = usize::from_str_radix(self.line().await.split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    return body;
                }
                body.extend(self.take(size).await);
                assert!(self.line().await.is_empty());
            }
        }
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    async fn response(&mut self) -> Resp {
        let (status, headers) = self.head().await;
        let body = if status == 101 || status == 204 || status == 304 { Vec::new() } else { self.body(&headers).await };
        Resp { status, headers, body }
    }

    /// Whether the proxy closed the connection (EOF or reset) with nothing more to read.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(t("read for EOF", self.s.read(&mut b)).await, Ok(0) | Err(_))
    }
}

// === the app ===

/// What the app saw and what the test can steer.
#[derive(Default)]
struct AppState {
    accepts: AtomicUsize,
    open: AtomicUsize,
    /// Bytes of `/upload` received so far.
    upload_progress: watch::Sender<u64>,
    /// `/gate` requests arrived.
    arrived: Notify,
    /// Releases `/gate` and `/download?wait`.
    release: Notify,
}

struct App {
    addr: SocketAddr,
    state: Arc<AppState>,
}

/// Deterministic test data.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(|i| (i.wrapping_mul(31) ^ (i >> 13)) as u8).collect()
}

/// FNV-1a, to compare big bodies without keeping them.
fn fnv(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}
const FNV0: u64 = 0xcbf29ce484222325;

/// A body fed through a channel (streamed, bounded by the channel).
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type AppBody = http_body_util::Either<http_body_util::Full<Bytes>, ChanBody>;

fn full(s: impl Into<Bytes>) -> AppBody {
    http_body_util::Either::Left(http_body_util::Full::new(s.into()))
}

async fn app_handle(state: Arc<AppState>, mut req: Request<Incoming>) -> Response<AppBody> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/headers" => {
            let mut out = String::new();
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            Response::new(full(out))
        }
        "/hop" => Response::builder()
            .header("connection", "X-Internal")
            .header("x-internal", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-kept", "yes")
            .body(full("hop"))
            .unwrap(),
        "/upload" => {
            let (mut len, mut sum) = (0u64, FNV0);
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return Response::builder().status(400).body(full("broken")).unwrap() };
                if let Some(d) = frame.data_ref() {
                    len += d.len() as u64;
                    sum = fnv(sum, d);
                    state.upload_progress.send_replace(len);
                }
            }
            Response::new(full(format!("{len} {sum:x}")))
        }
        "/download" => {
            let q = req.uri().query().unwrap_or("");
            let n: u64 = q.split('&').find_map(|p| p.strip_prefix("n=")).unwrap().parse().unwrap();
            let wait = q.contains("wait");
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let chunk = 256 * 1024;
                let mut off = 0u64;
                while off < n {
                    let len = chunk.min((n - off) as usize);
                    if tx.send(Bytes::from(pattern(off, len))).await.is_err() {
                        return;
                    }
                    if off == 0 && wait {
                        state.release.notified().await;
                    }
                    off += len as u64;
                }
            });
            Response::new(http_body_util::Either::Right(ChanBody(rx)))
        }
        "/gate" => {
            state.arrived.notify_one();
            state.release.notified().await;
            Response::new(full("done"))
        }
        "/hang" => std::future::pending().await,
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(full(""))
                .unwrap()
        }
        _ => Response::new(full(format!("app:{path}"))),
    }
}

impl App {
    async fn start() -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AppState::default());
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                s.accepts.fetch_add(1, Ordering::SeqCst);
                s.open.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn({
                        let s = s.clone();
                        move |req| {
                            let s = s.clone();
                            async move { Ok::<_, Infallible>(app_handle(s, req).await) }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                    s.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        App { addr, state }
    }

    fn accepts(&self) -> usize {
        self.state.accepts.load(Ordering::SeqCst)
    }
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

const OOS_BODY: &str = r#"{"type":"about:blank","title":"Service Unavailable","status":503,"cause":"OUT OF SERVICE"}"#;

// === tests ===

/// A request in service reaches the app and its status and body come back.
#[tokio::test]
async fn in_service_request_is_proxied_with_its_body() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[("db", "out_of_service")]));
    let r = p.client().await.get("/hello?x=1").await;
    assert_eq!((r.status, r.text().as_str()), (200, "app:/hello"));
    assert_eq!(p.count("proxied"), 1);
}

/// Several requests on one client connection use one upstream connection.
#[tokio::test]
async fn keep_alive_is_reused_on_both_sides() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    for i in 0..5 {
        let r = c.get(&format!("/n{i}")).await;
        assert_eq!(r.text(), format!("app:/n{i}"));
        assert_eq!(r.header("connection"), None);
        // A chunked response (no Content-Length) also returns its connection to the pool.
        let r = c.get("/download?n=1000").await;
        assert_eq!((r.header("transfer-encoding"), r.body.len()), (Some("chunked"), 1000));
    }
    assert_eq!(app.accepts(), 1, "one pooled upstream connection for ten requests");
    assert_eq!(p.gauge_active(), 1);
}

/// A critical dependency down: 503 problem+json with the exact default body and Retry-After; the app is not contacted.
#[tokio::test]
async fn dependency_down_answers_503_problem_json_without_contacting_the_app() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[("db", "out_of_service")]));
    p.set(0, DepHealth::Down);
    let mut c = p.client().await;
    let r = c.get("/orders").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(r.text(), OOS_BODY);
    let j = r.json();
    assert_eq!(
        (j["type"].as_str(), j["title"].as_str(), j["status"].as_u64()),
        (Some("about:blank"), Some("Service Unavailable"), Some(503))
    );
    assert_eq!(j["cause"], "OUT OF SERVICE");
    // The connection stays usable.
    assert_eq!(c.get("/again").await.status, 503);
    assert_eq!(app.accepts(), 0);
    assert_eq!(p.count("short_circuited"), 2);
}

/// A degraded dependency down: 500 with the degraded body.
#[tokio::test]
async fn degraded_dependency_answers_500_problem_json() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[("db", "out_of_service"), ("search", "degraded")]));
    p.set(1, DepHealth::Down);
    let r = p.client().await.get("/").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(
        r.text(),
        r#"{"type":"about:blank","title":"Internal Server Error","status":500,"cause":"Internal Server Error"}"#
    );
}

/// Before any verdict ("starting"), requests get the 503.
#[tokio::test]
async fn starting_without_a_verdict_answers_503() {
    let app = App::start().await;
    let p = Proxy::start(&yaml(app.addr, "", &[("db", "out_of_service")]));
    let r = p.client().await.get("/").await;
    assert_eq!((r.status, r.text().as_str()), (503, OOS_BODY));
}

/// A bypass path is proxied during an outage and counted as bypassed.
#[tokio::test]
async fn bypass_path_is_proxied_during_an_outage() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[("db", "out_of_service")]));
    p.set(0, DepHealth::Down);
    let mut c = p.client().await;
    let r = c.get("/healthz/deep").await;
    assert_eq!((r.status, r.text().as_str()), (200, "app:/healthz/deep"));
    assert_eq!(c.get("/other").await.status, 503);
    assert_eq!(p.count("bypassed"), 1);
}

/// A route needs only its own dependencies, answers with its own body, and
/// is counted under its own label.
#[tokio::test]
async fn routes_decide_needs_bodies_and_labels() {
    let app = App::start().await;
    let extra = "    routes:\n      - name: catalog\n        match:\n          path_prefix: /catalog\n        needs: [search]\n        short_circuit:\n          out_of_service_body: '{\"cause\":\"CATALOG DOWN\"}'\n";
    let p = Proxy::in_service(&yaml(app.addr, extra, &[("db", "out_of_service"), ("search", "out_of_service")]));
    let mut c = p.client().await;
    p.set(0, DepHealth::Down);
    assert_eq!(c.get("/catalog/1").await.text(), "app:/catalog/1", "catalog does not need db");
    assert_eq!(c.get("/cart").await.status, 503);
    p.set(0, DepHealth::Up);
    p.set(1, DepHealth::Down);
    let r = c.get("/catalog/2").await;
    assert_eq!((r.status, r.text().as_str()), (503, r#"{"cause":"CATALOG DOWN"}"#));
    assert_eq!(c.get("/cart").await.status, 503, "the default route needs every dependency");
    assert_eq!(c.get("/healthz").await.status, 200);
    assert_eq!(
        [
            p.count_route("proxied", "catalog"),
            p.count_route("short_circuited", "catalog"),
            p.count_route("short_circuited", "default"),
            p.count_route("bypassed", "bypass"),
        ],
        [1, 1, 2, 1]
    );
}

/// When the dependency comes back, requests are proxied again on the same connection.
#[tokio::test]
async fn requests_are_proxied_again_after_recovery() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[("db", "out_of_service")]));
    let mut c = p.client().await;
    p.set(0, DepHealth::Down);
    assert_eq!(c.get("/").await.status, 503);
    p.set(0, DepHealth::Up);
    let r = c.get("/back").await;
    assert_eq!((r.status, r.text().as_str()), (200, "app:/back"));
}

/// Hop-by-hop headers, and the headers Connection names, are removed in both directions.
#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(
        b"GET /headers HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=9\r\n\
TE: trailers\r\nTrailer: X-Sum\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-End: kept\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    let seen = r.text();
    for gone in [
        "connection:",
        "x-hop:",
        "keep-alive:",
        "te:",
        "trailer:",
        "proxy-authorization:",
        "proxy-connection:",
        "upgrade:",
    ] {
        assert!(!seen.lines().any(|l| l.starts_with(gone)), "{gone} reached the app:\n{seen}");
    }
    assert!(seen.contains("x-end: kept\n"), "{seen}");
    assert!(seen.contains("host: example.test\n"), "Host passed through unchanged:\n{seen}");

    let r = c.get("/hop").await;
    assert_eq!(r.header("x-kept"), Some("yes"));
    for gone in ["x-internal", "keep-alive", "proxy-authenticate"] {
        assert_eq!(r.header(gone), None, "{gone} reached the client: {:?}", r.headers);
    }
    assert_eq!(r.header("connection"), None);
}

/// X-Forwarded-For is appended, X-Forwarded-Proto set and Via added.
#[tokio::test]
async fn forwarding_headers_are_added() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(b"GET /headers HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n\r\n")
        .await;
    let r = c.response().await;
    let seen = r.text();
    assert!(seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("via: 1.1 healthgate\n"), "{seen}");
    assert_eq!(r.header("via"), Some("1.1 healthgate"));
    let seen = c.get("/headers").await.text();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
}

/// Each forwarding header can be switched off.
#[tokio::test]
async fn forwarding_headers_can_be_switched_off() {
    let app = App::start().await;
    let extra = "    x_forwarded_for: false\n    x_forwarded_proto: false\n    via: false\n";
    let p = Proxy::in_service(&yaml(app.addr, extra, &[]));
    let mut c = p.client().await;
    c.send(b"GET /headers HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n").await;
    let r = c.response().await;
    let seen = r.text();
    assert!(seen.contains("x-forwarded-for: 203.0.113.7\n"), "{seen}");
    assert!(!seen.contains("x-forwarded-proto"), "{seen}");
    assert!(!seen.contains("via:"), "{seen}");
    assert_eq!(r.header("via"), None);
}

/// A 64 MiB upload is streamed: the app receives data before the client has
/// sent the rest, and the checksum matches.
#[tokio::test]
async fn large_upload_is_streamed_to_the_app() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let total: u64 = 64 << 20;
    let mut c = p.client().await;
    c.send(format!("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {total}\r\n\r\n").as_bytes()).await;
    let first = 1 << 20;
    let mut sum = fnv(FNV0, &pattern(0, first));
    c.send(&pattern(0, first)).await;
    // Streaming: the app sees bytes while most of the body is still unsent.
    let mut progress = app.state.upload_progress.subscribe();
    t("app receives the first bytes", progress.wait_for(|n| *n > 0)).await.unwrap();
    let mut off = first as u64;
    while off < total {
        let chunk = pattern(off, (1 << 20).min((total - off) as usize));
        sum = fnv(sum, &chunk);
        c.send(&chunk).await;
        off += chunk.len() as u64;
    }
    let r = c.response().await;
    assert_eq!(r.text(), format!("{total} {sum:x}"));
}

/// A 64 MiB download is streamed: the client gets the first bytes before the
/// app produced the rest, and the checksum matches.
#[tokio::test]
async fn large_download_is_streamed_to_the_client() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let total: u64 = 64 << 20;
    let mut c = p.client().await;
    c.send(format!("GET /download?n={total}&wait HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes()).await;
    let (status, headers) = c.head().await;
    assert_eq!(status, 200);
    // The app holds the rest back until we have seen body bytes.
    if c.buf.is_empty() {
        assert!(c.fill().await);
    }
    app.state.release.notify_one();
    let body = c.body(&headers).await;
    assert_eq!(body.len() as u64, total);
    assert_eq!(fnv(FNV0, &body), fnv(FNV0, &pattern(0, total as usize)));
}

/// A HEAD response keeps the app's Content-Length, has no body, and the
/// connection stays in sync for the next request.
#[tokio::test]
async fn head_response_keeps_its_length_and_the_connection() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(b"HEAD /abc HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let (status, headers) = c.head().await;
    assert_eq!(status, 200);
    assert!(headers.contains(&("content-length".to_string(), "8".to_string())), "{headers:?}");
    assert_eq!(c.get("/next").await.text(), "app:/next");
}

/// A chunked request body is forwarded intact.
#[tokio::test]
async fn chunked_request_body_is_forwarded() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(
        b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.text(), format!("11 {:x}", fnv(FNV0, b"hello world")));
    // The connection is still usable afterwards.
    assert_eq!(c.get("/x").await.text(), "app:/x");
}

/// A Content-Length over max_body_bytes gets 413 at once and the app is not contacted.
#[tokio::test]
async fn content_length_over_the_limit_gets_413() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    max_body_bytes: 1000\n", &[]));
    let mut c = p.client().await;
    c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 413);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(app.accepts(), 0);
    assert_eq!(p.count("bad_request"), 1);
}

/// A chunked body growing over max_body_bytes is cut: the client gets 413.
#[tokio::test]
async fn chunked_body_over_the_limit_is_cut_with_413() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    max_body_bytes: 1000\n", &[]));
    let mut c = p.client().await;
    c.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n").await;
    for _ in 0..3 {
        c.send(format!("{:x}\r\n{}\r\n", 600, "a".repeat(600)).as_bytes()).await;
    }
    let r = c.response().await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(p.count("bad_request"), 1);
}

/// Request headers over max_header_bytes get 431 from hyper, counted as bad_request.
#[tokio::test]
async fn oversized_request_headers_get_431() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    max_header_bytes: 8192\n", &[]));
    let mut c = p.client().await;
    c.send(format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n", "b".repeat(10_000)).as_bytes()).await;
    let (status, _) = c.head().await;
    assert_eq!(status, 431);
    eventually("bad_request counted", STEP, || async { (p.count("bad_request") == 1).then_some(()) }).await;
}

/// An absolute-form request goes to the configured app (never to the host
/// in the URI) in origin-form, with `Host` taken from the URI; another
/// scheme is refused with 400.
#[tokio::test]
async fn absolute_form_goes_to_the_app_in_origin_form_and_other_schemes_get_400() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(b"GET http://elsewhere.test/headers HTTP/1.1\r\nHost: other.test\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    let seen = String::from_utf8_lossy(&r.body).to_string();
    assert!(seen.contains("host: elsewhere.test\n"), "{seen}");
    assert_eq!(app.accepts(), 1);
    let mut c = p.client().await;
    c.send(b"GET ftp://elsewhere.test/x HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n").await;
    assert_eq!(c.response().await.status, 400);
    assert_eq!(p.count("bad_request"), 1);
}

/// A malformed request is refused by hyper with 400 and counted as bad_request.
#[tokio::test]
async fn malformed_request_gets_400_and_is_counted() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(b"NOT HTTP AT ALL\r\n\r\n").await;
    let (status, _) = c.head().await;
    assert_eq!(status, 400);
    eventually("bad_request counted", STEP, || async { (p.count("bad_request") == 1).then_some(()) }).await;
    assert_eq!(app.accepts(), 0);
}

/// The app unreachable: 502 problem+json with cause BAD GATEWAY.
#[tokio::test]
async fn app_unreachable_answers_502() {
    let p = Proxy::in_service(&yaml(dead_addr(), "", &[]));
    let mut c = p.client().await;
    let r = c.get("/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.text(), r#"{"type":"about:blank","title":"Bad Gateway","status":502,"cause":"BAD GATEWAY"}"#);
    // Still a usable client connection.
    assert_eq!(c.get("/").await.status, 502);
    assert_eq!(p.count("upstream_error"), 2);
}

/// The app not answering within upstream_response_timeout: 504.
#[tokio::test]
async fn slow_app_answers_504() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    upstream_response_timeout: 300ms\n", &[]));
    let r = p.client().await.get("/hang").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["cause"], "GATEWAY TIMEOUT");
    assert_eq!(r.json()["title"], "Gateway Timeout");
    assert_eq!(p.count("upstream_error"), 1);
}

/// The upstream response deadline belongs to one request: after a 504 the
/// same client connection gets the next request proxied, and that one is
/// not cut short by the deadline the first one left behind.
#[tokio::test]
async fn the_request_after_a_504_on_the_same_connection_is_proxied() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    upstream_response_timeout: 300ms\n", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/hang").await.status, 504);
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(c.get("/hang").await.status, 504);
    assert_eq!(p.count("upstream_error"), 2);
}

/// A WebSocket-style upgrade is relayed, then bytes flow both ways.
#[tokio::test]
async fn websocket_upgrade_is_relayed_both_ways() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    let (status, headers) = c.head().await;
    let h: HashMap<_, _> = headers.into_iter().collect();
    assert_eq!(status, 101);
    assert_eq!(h.get("upgrade").map(String::as_str), Some("websocket"));
    assert_eq!(h.get("connection").map(String::as_str), Some("upgrade"));
    assert_eq!(h.get("sec-websocket-accept").map(String::as_str), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    for msg in [&b"ping"[..], &pattern(0, 300_000)] {
        c.send(msg).await;
        assert_eq!(c.take(msg.len()).await, msg);
    }
    // Short-circuit applies to upgrades too.
    let p2 = Proxy::in_service(&yaml(app.addr, "", &[("db", "out_of_service")]));
    p2.set(0, DepHealth::Down);
    let mut c2 = p2.client().await;
    c2.send(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await;
    assert_eq!(c2.response().await.status, 503);
}

/// An upgraded tunnel in which nothing moves for the listener's
/// `idle_timeout` is closed; traffic keeps it open past that time.
#[tokio::test]
async fn upgraded_tunnel_is_closed_after_idle_timeout_not_while_busy() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    idle_timeout: 600ms\n", &[]));
    let mut c = p.client().await;
    c.send(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await;
    assert_eq!(c.head().await.0, 101);
    // 1.2 s of traffic, a message every 200 ms: twice the idle timeout, kept open.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.send(b"ping").await;
        assert_eq!(c.take(4).await, b"ping");
    }
    let quiet = Instant::now();
    assert!(c.closed().await, "a quiet tunnel is closed");
    let after = quiet.elapsed();
    assert!(after >= Duration::from_millis(550), "closed only after the idle timeout, not {after:?}");
}

/// Drain: in-flight request completes (with Connection: close), idle
/// connections close, new connections are refused, serve returns.
#[tokio::test]
async fn drain_finishes_in_flight_work_then_returns() {
    let app = App::start().await;
    let mut p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut idle = p.client().await;
    assert_eq!(idle.get("/").await.status, 200);
    let mut busy = p.client().await;
    busy.send(b"GET /gate HTTP/1.1\r\nHost: h\r\n\r\n").await;
    t("request reaches the app", app.state.arrived.notified()).await;

    p.drain.send_replace(Some(Instant::now() + Duration::from_secs(10)));
    assert!(idle.closed().await, "idle keep-alive connection closes on drain");
    let addr = p.addr;
    eventually(
        "new connections refused",
        STEP,
        || async move { TcpStream::connect(addr).await.is_err().then_some(()) },
    )
    .await;

    app.state.release.notify_one();
    let r = busy.response().await;
    assert_eq!((r.status, r.text().as_str()), (200, "done"));
    assert_eq!(r.header("connection"), Some("close"));
    t("serve returns", p.done.take().unwrap()).await.unwrap();
}

/// Drain returns at the deadline even when a request never finishes.
#[tokio::test]
async fn drain_returns_at_the_deadline() {
    let app = App::start().await;
    let mut p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n").await;
    eventually("request reaches the app", STEP, || async {
        (app.state.open.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    p.drain.send_replace(Some(Instant::now() + Duration::from_millis(300)));
    t("serve returns at the deadline", p.done.take().unwrap()).await.unwrap();
}

/// Each outcome is counted under its own label.
#[tokio::test]
async fn metrics_count_each_outcome() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    max_body_bytes: 10\n", &[("db", "out_of_service")]));
    let mut c = p.client().await;
    c.get("/a").await;
    c.get("/b").await;
    p.set(0, DepHealth::Down);
    c.get("/c").await;
    c.get("/healthz").await;
    let mut c2 = p.client().await;
    c2.send(b"POST /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n").await;
    assert_eq!(c2.response().await.status, 413);
    let dead = Proxy::in_service(&yaml(dead_addr(), "", &[]));
    dead.client().await.get("/").await;
    assert_eq!(
        [p.count("proxied"), p.count("short_circuited"), p.count("bypassed"), p.count("bad_request")],
        [2, 1, 1, 1]
    );
    assert_eq!(dead.count("upstream_error"), 1);
    let text = p.metrics.render_prometheus();
    assert!(
        text.contains(
            "healthgate_request_duration_seconds_count{listener=\"web\",outcome=\"proxied\",route=\"default\"} 2"
        ),
        "{text}"
    );
}

/// An idle keep-alive client connection is closed after client_idle_timeout,
/// and the active-connections gauge follows.
#[tokio::test]
async fn idle_client_connection_is_closed_after_the_idle_timeout() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    client_idle_timeout: 300ms\n", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/").await.status, 200);
    let idle_from = Instant::now();
    assert!(c.closed().await);
    assert!(idle_from.elapsed() < Duration::from_secs(5), "closed by the idle timeout, not the header timeout");
    eventually("gauge back to 0", STEP, || async { (p.gauge_active() == 0).then_some(()) }).await;
}

/// A parked idle connection (hyper state released) serves the next request
/// on the same TCP connection, including a pipelined pair.
#[tokio::test]
async fn parked_idle_connection_serves_the_next_requests() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/1").await.text(), "app:/1");
    p.until_parked(1).await;
    assert_eq!(c.get("/2").await.text(), "app:/2");
    assert_eq!(p.gauge_parked(), 0, "a request wakes the parked connection");
    p.until_parked(1).await;
    c.send(b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\nGET /4 HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(c.response().await.text(), "app:/3");
    assert_eq!(c.response().await.text(), "app:/4");
    assert_eq!(p.gauge_active(), 1);
}

/// A request head that arrives in pieces, on a new connection and on a
/// parked one, is served once it is complete (the wait for a head without
/// hyper keeps every byte, in order), and a pipelined request behind it too.
#[tokio::test]
async fn a_head_arriving_in_pieces_is_served_on_new_and_parked_connections() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    for piece in [&b"GET /pie"[..], b"ces HTTP/1.1\r\nHo", b"st: h\r\n", b"\r"] {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    c.send(b"\n").await;
    assert_eq!(c.response().await.text(), "app:/pieces");
    p.until_parked(1).await;
    c.send(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Le").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.send(b"ngth: 3\r\n\r\nabcGET /next HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(c.response().await.text(), "app:/b");
    assert_eq!(c.response().await.text(), "app:/next");
}

/// A parked connection still closes at client_idle_timeout, and on drain.
#[tokio::test]
async fn parked_connection_closes_on_idle_timeout_and_on_drain() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    client_idle_timeout: 3s\n", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/").await.status, 200);
    let idle_from = Instant::now();
    assert!(c.closed().await);
    let waited = idle_from.elapsed();
    assert!(waited >= Duration::from_millis(2500) && waited < Duration::from_secs(8), "closed after {waited:?}");

    let mut p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/").await.status, 200);
    p.until_parked(1).await;
    p.drain.send_replace(Some(Instant::now() + Duration::from_secs(10)));
    assert!(c.closed().await);
    t("serve returns", p.done.take().unwrap()).await.unwrap();
}

/// A client that starts a request head but never finishes it is cut off
/// after header_read_timeout (even with a longer idle timeout).
#[tokio::test]
async fn slow_request_head_is_cut_after_header_read_timeout() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    header_read_timeout: 300ms\n    client_idle_timeout: 60s\n", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/").await.status, 200);
    c.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n").await;
    let started = Instant::now();
    assert!(c.closed().await);
    assert!(started.elapsed() < Duration::from_secs(5), "closed by the header timeout, not the idle timeout");
}

/// A short-circuited request with a small body keeps the connection usable;
/// one with a large body gets `Connection: close`.
#[tokio::test]
async fn short_circuited_request_bodies_do_not_desync_the_connection() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[("db", "out_of_service")]));
    p.set(0, DepHealth::Down);
    let mut c = p.client().await;
    c.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello").await;
    let r = c.response().await;
    assert_eq!((r.status, r.header("connection")), (503, None));
    assert_eq!(c.get("/y").await.status, 503, "the small body was consumed, not parsed as a request");

    let mut c = p.client().await;
    c.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10000000\r\n\r\npartial").await;
    let r = c.response().await;
    assert_eq!((r.status, r.header("connection")), (503, Some("close")));
    assert!(c.closed().await);

    // A client waiting for 100-continue is answered at once, without a 100.
    let mut c = p.client().await;
    c.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await;
    let r = c.response().await;
    assert_eq!((r.status, r.header("connection")), (503, Some("close")));
}

/// Idle pooled upstream connections are closed after upstream_idle_timeout.
#[tokio::test]
async fn idle_upstream_connections_expire() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    upstream_idle_timeout: 200ms\n", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/").await.status, 200);
    eventually("pooled connection closed", STEP, || async {
        (app.state.open.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    // The next request opens a fresh connection.
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(app.accepts(), 2);
}

/// A raw app that answers the first request of each connection and closes
/// the connection, unanswered, on the second: what an app's keep-alive
/// timeout does to a request racing with it. Returns (address, accepts).
async fn closing_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let a = accepts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                for answer in [true, false] {
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    got.clear();
                    if answer {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                    }
                }
            });
        }
    });
    (addr, accepts)
}

/// An idle pooled connection that the app closes under a GET is replayed on
/// a new connection; a POST is not (the app may have acted on it): 502.
#[tokio::test]
async fn idempotent_request_is_replayed_when_an_idle_pooled_connection_closes() {
    let (addr, accepts) = closing_app().await;
    let p = Proxy::in_service(&yaml(addr, "", &[]));
    let mut c = p.client().await;
    assert_eq!(c.get("/").await.text(), "ok");
    // Let the pooled connection become idle long enough to be at risk (a
    // precondition on elapsed time, not a synchronisation).
    tokio::time::sleep(healthgate::proxy::http::REPLAY_AFTER_IDLE + Duration::from_millis(50)).await;
    let r = c.get("/").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "replayed on a fresh connection");
    assert_eq!(accepts.load(Ordering::SeqCst), 2);

    tokio::time::sleep(healthgate::proxy::http::REPLAY_AFTER_IDLE + Duration::from_millis(50)).await;
    c.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi").await;
    assert_eq!(c.response().await.status, 502);
    assert_eq!(accepts.load(Ordering::SeqCst), 2, "not resent");
}

/// With max_connections reached, a further connection waits until a slot frees.
#[tokio::test]
async fn max_connections_holds_further_connections_back() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    max_connections: 1\n", &[]));
    let mut first = p.client().await;
    assert_eq!(first.get("/1").await.status, 200);
    let mut second = p.client().await;
    second.send(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let mut b = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(300), second.s.peek(&mut b)).await.is_err(),
        "second connection served while the first is open"
    );
    drop(first);
    let r = second.response().await;
    assert_eq!(r.text(), "app:/2");
}

/// A request whose client goes away (resets the connection) before the
/// response head is counted once as `client_closed`, with its duration,
/// under the route it took: the connection timer notices the reset although
/// hyper does not read a client whose request is at the app.
#[tokio::test]
async fn requests_whose_client_reset_before_the_answer_count_as_client_closed() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    for _ in 0..10 {
        let mut c = p.client().await;
        c.send(b"GET /gate HTTP/1.1\r\nHost: h\r\n\r\n").await;
        t("request reaches the app", app.state.arrived.notified()).await;
        c.reset();
    }
    eventually("10 requests counted as client_closed", STEP, || async {
        (p.count_route("client_closed", "default") == 10).then_some(())
    })
    .await;
    let text = p.metrics.render_prometheus();
    assert!(
        text.contains(
            "healthgate_request_duration_seconds_count{listener=\"web\",outcome=\"client_closed\",route=\"default\"} 10"
        ),
        "{text}"
    );
    assert_eq!(p.count("proxied") + p.count("upstream_error"), 0, "counted once, as client_closed only");
}

/// A client that shuts down its sending side after a complete request (a
/// half-close, RFC 9112 §9.6) still gets the answer, counted `proxied`.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "", &[]));
    let mut c = p.client().await;
    c.send(b"GET /gate HTTP/1.1\r\nHost: h\r\n\r\n").await;
    t("request reaches the app", app.state.arrived.notified()).await;
    t("shutdown", c.s.shutdown()).await.unwrap();
    // Past a few timer ticks: the FIN alone must not cancel the request.
    tokio::time::sleep(healthgate::proxy::http::PARK_AFTER * 3).await;
    app.state.release.notify_one();
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert!(c.closed().await, "the connection ends after the answer");
    assert_eq!(p.count("proxied"), 1);
    assert_eq!(p.count("client_closed"), 0);
}

/// With `abort_on_client_close`, a client that closes its sending side while
/// its request is at the app is taken to have left: counted `client_closed`.
#[tokio::test]
async fn with_abort_on_client_close_a_fin_cancels_the_request_as_client_closed() {
    let app = App::start().await;
    let p = Proxy::in_service(&yaml(app.addr, "    abort_on_client_close: true\n", &[]));
    let mut c = p.client().await;
    c.send(b"GET /gate HTTP/1.1\r\nHost: h\r\n\r\n").await;
    t("request reaches the app", app.state.arrived.notified()).await;
    drop(c);
    eventually("counted as client_closed", STEP, || async { (p.count("client_closed") == 1).then_some(()) }).await;
    assert_eq!(p.count("proxied"), 0);
}
