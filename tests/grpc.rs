//! gRPC and HTTP/2 through the real binary, with real clients and servers:
//! a Python `grpcio` app and client (tests/grpc/app.py, client.py; generic
//! handlers and raw-bytes serializers, so no code generation), curl with
//! `--http2-prior-knowledge`, HTTP/1.1 clients on the same port, and a
//! hyper h2c app for the HTTP/1.1-client-to-h2c-app translation.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::Dep;
use support::app::App;
use support::healthgate::{Healthgate, http_request};
use support::{STEP, eventually_blocking};

/// Bound for anything that should happen "soon" on a loaded 2-core machine.
const WITHIN: Duration = Duration::from_secs(15);

fn script(name: &str) -> String {
    format!("{}/tests/grpc/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The Python gRPC app, stopped on drop.
struct GrpcApp {
    child: Child,
    addr: SocketAddr,
}

impl GrpcApp {
    fn start() -> GrpcApp {
        let mut child = Command::new("python3")
            .arg(script("app.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 tests/grpc/app.py");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the gRPC app prints its port");
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("gRPC app port, got {line:?}"));
        GrpcApp { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    /// Calls the app has served (asked of the app directly).
    fn calls(&self) -> u64 {
        let v = call(self.addr, "unary", "/svc.Echo/Calls", "");
        assert_eq!(v["code"], "OK", "{v}");
        v["responses"][0].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One call with the Python client; its outcome as JSON.
fn call(target: SocketAddr, kind: &str, method: &str, request: &str) -> serde_json::Value {
    call_with_timeout(target, kind, method, request, 20.0)
}

fn call_with_timeout(target: SocketAddr, kind: &str, method: &str, request: &str, secs: f64) -> serde_json::Value {
    let out = Command::new("timeout")
        .arg("90")
        .arg("python3")
        .arg(script("client.py"))
        .args([&target.to_string(), kind, method, request, &secs.to_string()])
        .output()
        .expect("python3 tests/grpc/client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("client output: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)))
}

fn dep_yaml(addr: SocketAddr, impact: &str) -> String {
    format!(
        "  - name: db\n    type: tcp\n    address: \"{addr}\"\n    impact: {impact}\n    interval: 100ms\n    timeout: 500ms\n    rise: 1\n    fall: 1\n"
    )
}

/// healthgate with one listener (`listener_extra` indented for it) in front
/// of `upstream`, needing the dependency `db` at `dep`.
fn start(upstream: SocketAddr, listener_extra: &str, top_extra: &str, dep: &str) -> Healthgate {
    let cfg = format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\n{top_extra}listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{upstream}\"\n{listener_extra}dependencies:\n{dep}"
    );
    Healthgate::start(&cfg)
}

fn metric(hg: &Healthgate, series: &str) -> f64 {
    let (_, text) = hg.admin_get("/metrics");
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

#[test]
fn unary_and_server_streaming_calls_are_proxied_with_trailers_intact() {
    let app = GrpcApp::start();
    let db = Dep::up();
    let hg = start(app.addr, "    upstream_protocol: h2c\n", "", &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Say", "hello");
    assert_eq!(v["code"], "OK", "{v}");
    assert_eq!(v["responses"], serde_json::json!(["echo:hello"]));
    assert_eq!(v["trailers"]["x-trailer"], "said", "the app's trailers reach the client: {v}");
    let v = call(hg.listeners[0], "stream", "/svc.Echo/Items", "5,20");
    assert_eq!(v["code"], "OK", "{v}");
    assert_eq!(v["responses"], serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"]));
    assert_eq!(v["trailers"]["x-trailer"], "streamed", "{v}");
    assert!(
        metric(&hg, "healthgate_requests_total{listener=\"web\",outcome=\"proxied\",route=\"default\"}") >= 2.0,
        "HTTP/2 streams count as requests"
    );
}

#[test]
fn a_call_while_the_critical_dependency_is_down_gets_unavailable_with_details_and_never_reaches_the_app() {
    let app = GrpcApp::start();
    let mut db = Dep::up();
    let sc = "short_circuit:\n  retry_after: 7s\n  expose_dependencies: true\n";
    let hg = start(app.addr, "    upstream_protocol: h2c\n", sc, &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let before = app.calls();
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Say", "hello");
    assert_eq!(v["code"], "UNAVAILABLE", "{v}");
    assert_eq!(v["details"], "OUT OF SERVICE");
    let s = &v["status"];
    assert_eq!(s["code"], 14, "google.rpc.Status.code equals grpc-status: {v}");
    assert_eq!(s["error_info"]["reason"], "DEPENDENCY_UNAVAILABLE");
    assert_eq!(s["error_info"]["domain"], "healthgate");
    assert_eq!(s["error_info"]["metadata"]["dependencies"], "db", "named with expose_dependencies");
    assert_eq!(s["retry_delay_s"], 7.0, "RetryInfo carries retry_after");
    let v = call(hg.listeners[0], "stream", "/svc.Echo/Items", "3");
    assert_eq!(v["code"], "UNAVAILABLE", "a streaming call too: {v}");
    // (`Calls` does not count itself.)
    assert_eq!(app.calls(), before, "no short-circuited call reached the app");
    assert_eq!(metric(&hg, "healthgate_grpc_local_responses_total{listener=\"web\",grpc_status=\"14\"}"), 2.0);
    assert!(
        metric(&hg, "healthgate_requests_total{listener=\"web\",outcome=\"short_circuited\",route=\"default\"}") >= 2.0
    );

    db.revive();
    hg.wait_state("in_service", WITHIN);
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Say", "again");
    assert_eq!((v["code"].as_str(), v["responses"][0].as_str()), (Some("OK"), Some("echo:again")), "recovered: {v}");
}

#[test]
fn degraded_calls_get_the_configured_status_without_dependency_names_by_default() {
    let app = GrpcApp::start();
    let mut db = Dep::up();
    let sc = "short_circuit:\n  grpc:\n    degraded_status: RESOURCE_EXHAUSTED\n";
    let extra = "    upstream_protocol: h2c\n    needs: [db]\n";
    let hg = start(app.addr, extra, sc, &dep_yaml(db.addr, "degraded"));
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("degraded", WITHIN);
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Say", "x");
    assert_eq!(v["code"], "RESOURCE_EXHAUSTED", "{v}");
    assert_eq!(v["status"]["error_info"]["reason"], "DEPENDENCY_DEGRADED");
    assert_eq!(v["status"]["error_info"]["metadata"], serde_json::json!({}), "names only on opt-in");
}

#[test]
fn upstream_failures_of_a_grpc_call_map_to_unavailable_and_deadline_exceeded() {
    let app = GrpcApp::start();
    let db = Dep::up();
    let extra = "    upstream_protocol: h2c\n    upstream_response_timeout: 500ms\n";
    let hg = start(app.addr, extra, "", &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Sleep", "3000");
    assert_eq!(v["code"], "DEADLINE_EXCEEDED", "no response head within upstream_response_timeout: {v}");
    drop(app);
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Say", "x");
    assert_eq!(v["code"], "UNAVAILABLE", "the app is gone: {v}");
    assert_eq!(metric(&hg, "healthgate_grpc_local_responses_total{listener=\"web\",grpc_status=\"4\"}"), 1.0);
}

#[test]
fn a_grpc_call_towards_an_http1_app_gets_unimplemented_with_the_reason() {
    let app = App::start();
    let db = Dep::up();
    let hg = start(app.addr, "", "", &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Say", "x");
    assert_eq!(v["code"], "UNIMPLEMENTED", "{v}");
    assert!(v["details"].as_str().unwrap().contains("upstream_protocol: h2c"), "{v}");
    assert_eq!(app.requests(), 0, "the app never sees the call");
}

#[test]
fn data_plane_health_checks_are_forwarded_while_needs_are_met_and_short_circuited_otherwise() {
    let app = GrpcApp::start();
    let mut db = Dep::up();
    let hg = start(app.addr, "    upstream_protocol: h2c\n", "", &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let v = call(hg.listeners[0], "unary", "/grpc.health.v1.Health/Check", "");
    assert_eq!(v["code"], "OK", "the app answers its own health: {v}");
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let v = call(hg.listeners[0], "unary", "/grpc.health.v1.Health/Check", "");
    assert_eq!(v["code"], "UNAVAILABLE", "{v}");
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_string(), status.to_string())
}

#[test]
fn http2_prior_knowledge_and_http1_clients_share_the_listener_in_front_of_an_http1_app() {
    let app = App::start();
    let db = Dep::up();
    let hg = start(app.addr, "", "", &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let url = format!("http://{}/orders/1", hg.listeners[0]);
    let (body, status) = curl(&["--http2-prior-knowledge", &url]);
    assert_eq!((body.as_str(), status.as_str()), ("app:GET /orders/1", "200 2"), "HTTP/2 client, HTTP/1.1 app");
    let (body, status) = curl(&["--http2-prior-knowledge", "-d", "payload", &url]);
    assert_eq!((body.as_str(), status.as_str()), ("app:POST /orders/1", "200 2"), "a request body crosses");
    let (body, status) = curl(&["--http1.1", &url]);
    assert_eq!((body.as_str(), status.as_str()), ("app:GET /orders/1", "200 1.1"));
    let above = format!("http://{}/../x", hg.listeners[0]);
    let (body, status) = curl(&["--http2-prior-knowledge", "--path-as-is", &above]);
    assert_eq!(status, "400 2", "a path above the root is refused per stream: {body}");
    let (body, status) = curl(&["--http2-prior-knowledge", &url]);
    assert_eq!((body.as_str(), status.as_str()), ("app:GET /orders/1", "200 2"));
    assert_eq!(app.requests(), 4, "the refused request never reached the app");
    let (status, _, body) = http_request(hg.listeners[0], "GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    assert_eq!((status, body.as_str()), (200, "app:GET /x"));
}

#[test]
fn an_http2_client_gets_problem_json_while_out_of_service() {
    let app = App::start();
    let mut db = Dep::up();
    let hg = start(app.addr, "", "", &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let url = format!("http://{}/orders/1", hg.listeners[0]);
    let (body, status) = curl(&["--http2-prior-knowledge", &url]);
    assert_eq!(status, "503 2");
    assert!(body.contains("OUT OF SERVICE"), "{body}");
    assert_eq!(app.requests(), 0);
}

/// A hyper h2c app answering `h2:<METHOD> <path> <body length>` with
/// trailers `x-app: h2`.
fn h2c_app() -> SocketAddr {
    use http_body_util::BodyExt;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let head = format!("h2:{} {} ", req.method(), req.uri().path());
                        let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("x-app", "h2".parse().unwrap());
                        let body = DataThenTrailers(Some(bytes::Bytes::from(format!("{head}{n}"))), Some(trailers));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    addr
}

/// One data frame, then trailers.
struct DataThenTrailers(Option<bytes::Bytes>, Option<hyper::HeaderMap>);

impl hyper::body::Body for DataThenTrailers {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(d) = self.0.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
        }
        std::task::Poll::Ready(self.1.take().map(|t| Ok(hyper::body::Frame::trailers(t))))
    }
}

#[test]
fn http1_and_http2_clients_reach_an_h2c_app_with_bodies() {
    let app = h2c_app();
    let db = Dep::up();
    let hg = start(app, "    upstream_protocol: h2c\n", "", &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let url = format!("http://{}/up", hg.listeners[0]);
    let (body, status) = curl(&["--http1.1", "-d", "12345", &url]);
    assert_eq!((body.as_str(), status.as_str()), ("h2:POST /up 5", "200 1.1"), "HTTP/1.1 client, h2c app");
    let (body, status) = curl(&["--http2-prior-knowledge", "-d", "1234567", &url]);
    assert_eq!((body.as_str(), status.as_str()), ("h2:POST /up 7", "200 2"));
    let (status, _, body) = http_request(
        hg.listeners[0],
        "POST /c HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    // Relayed chunked (the app's body has trailers and no length).
    assert_eq!(status, 200);
    assert!(body.contains("\r\nh2:POST /c 3\r\n"), "a chunked HTTP/1.1 body crosses: {body:?}");
}

#[test]
fn drain_sends_goaway_and_an_open_stream_finishes() {
    let app = GrpcApp::start();
    let db = Dep::up();
    let top = "drain:\n  delay: 300ms\n  timeout: 20s\n";
    let mut hg = start(app.addr, "    upstream_protocol: h2c\n", top, &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let target = hg.listeners[0];
    // 12 items 250 ms apart: ~3 s, well past the drain delay.
    let streaming = std::thread::spawn(move || call(target, "stream", "/svc.Echo/Items", "12,250"));
    eventually_blocking("the call to reach the app", WITHIN, || (app.calls() >= 1).then_some(()));
    hg.signal("TERM");
    let v = streaming.join().unwrap();
    assert_eq!(v["code"], "OK", "the open stream finishes: {v}");
    assert_eq!(v["responses"].as_array().unwrap().len(), 12, "{v}");
    let status = hg.wait_exit(WITHIN + STEP);
    assert!(status.success(), "clean exit after the drain: {status:?}");
}

#[test]
fn maintenance_answers_calls_unavailable_with_reason_maintenance_and_no_dependency_names() {
    const TOKEN: &str = "s3cr3t-token-0123456789abcdef";
    let app = GrpcApp::start();
    let db = Dep::up();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    // Continues the `admin` block, then the top-level `short_circuit`.
    let top = format!(
        "  control:\n    token_file: {}\n    max_ttl: 1h\nshort_circuit:\n  expose_dependencies: true\n",
        token.display()
    );
    let hg = start(app.addr, "    upstream_protocol: h2c\n", &top, &dep_yaml(db.addr, "out_of_service"));
    hg.wait_state("in_service", WITHIN);
    let body = r#"{"ttl":"10m","reason":"migration"}"#;
    let raw = format!(
        "POST /control/maintenance HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, _) = http_request(hg.admin, &raw);
    assert_eq!(status, 200);
    hg.wait_state("maintenance", WITHIN);
    let v = call(hg.listeners[0], "unary", "/svc.Echo/Say", "x");
    assert_eq!((v["code"].as_str(), v["details"].as_str()), (Some("UNAVAILABLE"), Some("MAINTENANCE")), "{v}");
    assert_eq!(v["status"]["error_info"]["reason"], "MAINTENANCE");
    assert_eq!(v["status"]["error_info"]["metadata"], serde_json::json!({}), "no dependency is the cause");
}
