//! `grpc.health.v1.Health` on the admin port (issue 16), asked by a real
//! gRPC client (Python `grpcio` + `grpcio-health-checking`), next to the
//! HTTP/1.1 endpoints on the same port, and probed by a hostile HTTP/2 peer.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::Dep;
use support::healthgate::{Healthgate, http_request};

const WITHIN: Duration = Duration::from_secs(15);
/// The check interval of the dependencies in these tests.
const INTERVAL: Duration = Duration::from_secs(1);

/// The gRPC client: `check ADDR SERVICE...` prints a JSON object of service
/// → status name (or gRPC code name); `watch ADDR SERVICE SECONDS` prints
/// each status as it arrives; `call ADDR PATH [HEX]` makes a unary call with
/// these raw message bytes (default none) and prints the code; `watches ADDR N` opens N Watch streams
/// at once and prints the first answer of each; `probes ADDR N` makes N
/// `Check("")` calls on a new connection each and prints their p50 and max
/// seconds.
const CLIENT: &str = r#"
import json, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
mode, addr = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(addr)
stub = health_pb2_grpc.HealthStub(channel)
name = health_pb2.HealthCheckResponse.ServingStatus.Name
req = lambda s: health_pb2.HealthCheckRequest(service=s)
if mode == "check":
    out = {}
    for s in sys.argv[3:]:
        try:
            out[s] = name(stub.Check(req(s), timeout=10).status)
        except grpc.RpcError as e:
            out[s] = e.code().name
    print(json.dumps(out))
elif mode == "watch":
    try:
        for r in stub.Watch(req(sys.argv[3]), timeout=float(sys.argv[4])):
            print(name(r.status), flush=True)
    except grpc.RpcError as e:
        print("END " + e.code().name, flush=True)
elif mode == "call":
    try:
        channel.unary_unary(sys.argv[3])(bytes.fromhex(sys.argv[4]) if len(sys.argv) > 4 else b"", timeout=10)
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name)
elif mode == "probes":
    # Probes as the kubelet makes them: a new connection each, `Check("")`.
    import time
    times = []
    for _ in range(int(sys.argv[3])):
        t = time.monotonic()
        with grpc.insecure_channel(addr) as c:
            status = name(health_pb2_grpc.HealthStub(c).Check(req(""), timeout=10).status)
        times.append(time.monotonic() - t)
        assert status == "SERVING", status
        time.sleep(0.02)
    times.sort()
    print(json.dumps({"n": len(times), "p50": times[len(times) // 2], "max": times[-1]}))
elif mode == "watches":
    calls, out = [], []
    for _ in range(int(sys.argv[3])):
        call = stub.Watch(req(""), timeout=20)
        calls.append(call)
        try:
            out.append(name(next(call).status))
        except grpc.RpcError as e:
            out.append(e.code().name)
    print(json.dumps(out))
"#;

fn python(args: &[&str]) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(CLIENT)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3")
}

/// Runs the client to completion (bounded) and returns its output.
fn client(args: &[&str]) -> String {
    let mut child = python(args);
    let status = support::eventually_blocking("the gRPC client to finish", Duration::from_secs(60), || {
        child.try_wait().unwrap()
    });
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success(), "client {args:?} failed: {out}");
    out.trim().to_string()
}

fn check(admin: SocketAddr, services: &[&str]) -> serde_json::Value {
    let addr = admin.to_string();
    let mut args = vec!["check", addr.as_str()];
    args.extend_from_slice(services);
    serde_json::from_str(&client(&args)).unwrap()
}

fn dep(name: &str, impact: &str, addr: SocketAddr) -> String {
    format!(
        "  - name: {name}\n    type: tcp\n    address: \"{addr}\"\n    impact: {impact}\n    interval: {}ms\n    interval_down: {}ms\n    timeout: 300ms\n    rise: 1\n    fall: 1\n",
        INTERVAL.as_millis(),
        INTERVAL.as_millis()
    )
}

fn start(admin_extra: &str, deps: &[String]) -> Healthgate {
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\n{admin_extra}listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"127.0.0.1:9\"\ndependencies:\n{}",
        deps.concat()
    );
    Healthgate::start(&cfg)
}

#[test]
fn check_answers_each_service_name_like_its_probe_or_dependency() {
    let db = Dep::up();
    let mut audit = Dep::up();
    audit.kill();
    let hg = start("", &[dep("db", "out_of_service", db.addr), dep("audit", "observe", audit.addr)]);
    hg.wait_state("in_service", WITHIN);
    let got = check(hg.admin, &["", "readiness", "liveness", "startup", "db", "audit", "nope"]);
    assert_eq!(
        got,
        serde_json::json!({
            "": "SERVING", "readiness": "SERVING", "liveness": "SERVING", "startup": "SERVING",
            "db": "SERVING", "audit": "NOT_SERVING", "nope": "NOT_FOUND",
        })
    );
    let metrics = hg.admin_get("/metrics").1;
    for series in [
        "healthgate_grpc_health_requests_total{method=\"check\",code=\"ok\"} 6",
        "healthgate_grpc_health_requests_total{method=\"check\",code=\"not_found\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} not in:\n{metrics}");
    }
    // Readiness fails while draining (an operator drain is the same state).
    hg.signal("TERM");
    support::eventually_blocking("readiness NOT_SERVING after SIGTERM", WITHIN, || {
        (check(hg.admin, &[""])[""] == "NOT_SERVING").then_some(())
    });
    assert_eq!(check(hg.admin, &["liveness", "db"]), serde_json::json!({"liveness": "SERVING", "db": "SERVING"}));
}

#[test]
fn before_the_first_verdict_startup_and_readiness_are_not_serving() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let slow = format!(
        "  - name: slow\n    type: tcp\n    address: \"{}\"\n    send: \"x\"\n    expect: \"never\"\n    timeout: 5s\n",
        silent.local_addr().unwrap()
    );
    let hg = start("", &[slow]);
    assert_eq!(
        check(hg.admin, &["startup", "", "liveness", "slow"]),
        serde_json::json!({"startup": "NOT_SERVING", "": "NOT_SERVING", "liveness": "SERVING", "slow": "UNKNOWN"})
    );
}

/// A running Watch: its lines with their arrival times.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
}

impl Watch {
    fn start(admin: SocketAddr, service: &str) -> Watch {
        let mut child = python(&["watch", &admin.to_string(), service, "120"]);
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Watch { child, lines }
    }

    /// The next message, within `within`.
    fn next(&self, within: Duration) -> (Instant, String) {
        self.lines.recv_timeout(within).unwrap_or_else(|_| panic!("no Watch message within {within:?}"))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `/status` until dependency `name` has `state`; returns when it was seen.
fn wait_dep(hg: &Healthgate, name: &str, state: &str) -> Instant {
    support::eventually_blocking(&format!("{name} {state}"), WITHIN, || {
        let s = hg.status();
        let d = s["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == name).cloned().unwrap();
        (d["state"] == state).then(Instant::now)
    })
}

/// `a - b` in milliseconds, negative when `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b { (a - b).as_secs_f64() * 1e3 } else { -(b - a).as_secs_f64() * 1e3 }
}

#[test]
fn watch_pushes_the_down_and_up_transitions_within_one_check_interval() {
    let mut db = Dep::up();
    let hg = start("", &[dep("db", "out_of_service", db.addr)]);
    hg.wait_state("in_service", WITHIN);
    let ready = Watch::start(hg.admin, "");
    let dep = Watch::start(hg.admin, "db");
    assert_eq!(ready.next(WITHIN).1, "SERVING", "the current status at once");
    assert_eq!(dep.next(WITHIN).1, "SERVING");

    db.kill();
    let seen = wait_dep(&hg, "db", "down");
    for w in [&dep, &ready] {
        let (at, status) = w.next(WITHIN);
        assert_eq!(status, "NOT_SERVING");
        // Pushed, not polled: at most one check interval after /status showed it.
        assert!(at < seen + INTERVAL, "NOT_SERVING came {:?} after /status showed the outage", at - seen);
        eprintln!("NOT_SERVING {:+.0} ms from /status", signed_ms(at, seen));
    }
    db.revive();
    let seen = wait_dep(&hg, "db", "up");
    for w in [&dep, &ready] {
        let (at, status) = w.next(WITHIN);
        assert_eq!(status, "SERVING");
        assert!(at < seen + INTERVAL, "SERVING came {:?} after /status showed the recovery", at - seen);
        eprintln!("SERVING {:+.0} ms from /status", signed_ms(at, seen));
    }
    // One message per change: nothing more while nothing changes.
    assert!(dep.lines.recv_timeout(3 * INTERVAL).is_err(), "a message without a change");
}

#[test]
fn watch_of_an_unknown_service_says_service_unknown_and_stays_open() {
    let hg = start("", &[dep("db", "out_of_service", support::always_up())]);
    let w = Watch::start(hg.admin, "nope");
    assert_eq!(w.next(WITHIN).1, "SERVICE_UNKNOWN");
    assert!(w.lines.recv_timeout(Duration::from_secs(2)).is_err(), "the stream stays open, silent");
}

#[test]
fn watch_streams_beyond_the_cap_are_refused_resource_exhausted() {
    let hg = start("  grpc:\n    max_watch_streams: 2\n", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    let got: serde_json::Value = serde_json::from_str(&client(&["watches", &hg.admin.to_string(), "3"])).unwrap();
    assert_eq!(got, serde_json::json!(["SERVING", "SERVING", "RESOURCE_EXHAUSTED"]));
    // The client has gone: its streams' permits are back.
    support::eventually_blocking("watch permits returned", WITHIN, || {
        let got: serde_json::Value = serde_json::from_str(&client(&["watches", &hg.admin.to_string(), "2"])).unwrap();
        (got == serde_json::json!(["SERVING", "SERVING"])).then_some(())
    });
}

#[test]
fn other_methods_are_unimplemented_and_a_malformed_message_is_internal() {
    let hg = start("", &[dep("db", "out_of_service", support::always_up())]);
    let admin = hg.admin.to_string();
    assert_eq!(client(&["call", &admin, "/grpc.health.v1.Health/List"]), "UNIMPLEMENTED");
    assert_eq!(client(&["call", &admin, "/some.Other/Method"]), "UNIMPLEMENTED");
    assert_eq!(client(&["call", &admin, "/grpc.health.v1.Health/Check"]), "OK", "the empty message is service \"\"");
    // A malformed request message (wire type 3) is INTERNAL, as gRPC servers answer it.
    assert_eq!(client(&["call", &admin, "/grpc.health.v1.Health/Check", "0b"]), "INTERNAL");
    // A message of another name is NOT_FOUND: field 1 "x".
    assert_eq!(client(&["call", &admin, "/grpc.health.v1.Health/Check", "0a0178"]), "NOT_FOUND");
}

/// curl over HTTP/2 prior knowledge: (status, headers and body as printed by `-i`).
fn curl_h2(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--http2-prior-knowledge", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.trim().parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn http1_endpoints_still_work_on_the_same_port_and_over_h2() {
    let hg = start("", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    assert_eq!(check(hg.admin, &[""])[""], "SERVING");
    assert_eq!(hg.admin_get("/readyz"), (200, "in_service\n".into()));
    assert_eq!(hg.admin_get("/livez").0, 200);
    assert!(hg.admin_get("/metrics").1.contains("healthgate_service_state"));
    // gRPC over HTTP/1.1 is a clear error, not a 404.
    let (status, _, body) = http_request(
        hg.admin,
        "POST /grpc.health.v1.Health/Check HTTP/1.1\r\nHost: a\r\ncontent-type: application/grpc\r\nContent-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0",
    );
    assert_eq!((status, body.as_str()), (505, "gRPC needs HTTP/2 (h2c with prior knowledge)\n"));

    let url = |p: &str| format!("http://{}{p}", hg.admin);
    let (status, text) = curl_h2(&[&url("/readyz")]);
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    // Not POST, or not gRPC content: plain HTTP errors.
    let (status, text) = curl_h2(&[&url("/grpc.health.v1.Health/Check")]);
    assert_eq!(status, 405, "{text}");
    assert!(text.to_ascii_lowercase().contains("allow: post"), "{text}");
    let (status, _) = curl_h2(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        "{}",
        &url("/grpc.health.v1.Health/Check"),
    ]);
    assert_eq!(status, 415);
    // A proper call by hand: HTTP 200, application/grpc, the message, grpc-status in the trailers.
    let body = std::env::temp_dir().join(format!("grpc-health-{}.bin", std::process::id()));
    std::fs::write(&body, [0u8, 0, 0, 0, 4, 0x0a, 0x02, b'd', b'b']).unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "10",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(url("/grpc.health.v1.Health/Check"))
        .args(["-D", "-", "-o", "-"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&body);
    let raw = out.stdout;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/2 200"), "{text}");
    assert!(text.contains("content-type: application/grpc"), "{text}");
    let message = raw.windows(7).position(|w| w == [0, 0, 0, 0, 2, 0x08, 0x01]);
    let status = raw.windows(14).position(|w| w == b"grpc-status: 0");
    // curl writes the trailers after the body: grpc-status comes after the message.
    assert!(matches!((message, status), (Some(m), Some(s)) if s > m), "framed SERVING, then grpc-status 0: {text}");
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK (no Huffman, no indexing) for a Watch request's head.
fn watch_head() -> Vec<u8> {
    let mut h = vec![0x83, 0x86]; // :method POST, :scheme http
    let lit = |h: &mut Vec<u8>, name_index: u8, value: &[u8]| {
        h.push(name_index);
        h.push(value.len() as u8);
        h.extend_from_slice(value);
    };
    lit(&mut h, 0x04, b"/grpc.health.v1.Health/Watch"); // :path
    lit(&mut h, 0x01, b"x"); // :authority
    h.extend_from_slice(&[0x0f, 0x10]); // content-type (static index 31)
    h.push(16);
    h.extend_from_slice(b"application/grpc");
    h
}

/// Reads frames from `s`, passing each frame's type and payload to `until`,
/// until it says stop or the peer closes (within `within`); true when closed.
fn read_frames(s: &mut TcpStream, within: Duration, mut until: impl FnMut(u8, &[u8]) -> bool) -> bool {
    let deadline = Instant::now() + within;
    let (mut buf, mut eof) = (Vec::new(), false);
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..9 + len).collect();
            if until(frame[3], &frame[9..]) {
                return false;
            }
        }
        if eof {
            return true;
        }
        assert!(Instant::now() < deadline, "neither the awaited frame nor a close within {within:?}");
        support::read_some(s, &mut buf, &mut eof, Duration::from_millis(200));
    }
}

fn h2_connect(admin: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&admin, support::STEP).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&h2_frame(0x4, 0, 0, &[])).unwrap(); // SETTINGS
    s
}

#[test]
fn a_rapid_reset_flood_is_cut_off_and_the_admin_port_keeps_serving() {
    let hg = start("", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    let mut s = h2_connect(hg.admin);
    let mut flood = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        flood.extend(h2_frame(0x1, 0x4, id, &watch_head())); // HEADERS, END_HEADERS
        flood.extend(h2_frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    // The server may close mid-write: that is the point.
    let _ = s.write_all(&flood);
    let mut goaway = false;
    read_frames(&mut s, WITHIN, |kind, _| {
        goaway |= kind == 0x7;
        false
    });
    assert!(goaway, "the flood was answered with a GOAWAY");
    assert_eq!(check(hg.admin, &[""])[""], "SERVING");
    assert_eq!(hg.admin_get("/readyz").0, 200);
}

#[test]
fn streams_beyond_the_concurrency_limit_are_refused_and_the_port_keeps_serving() {
    let hg = start("", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    let mut s = h2_connect(hg.admin);
    // 18 Watch requests whose bodies never come: each holds a stream open.
    // (Past 16 refusals h2 would close the connection: its reset limit.)
    let mut burst = Vec::new();
    for i in 0..18u32 {
        burst.extend(h2_frame(0x1, 0x4, 2 * i + 1, &watch_head()));
    }
    s.write_all(&burst).unwrap();
    let mut refused = 0;
    let closed = read_frames(&mut s, WITHIN, |kind, payload| {
        // RST_STREAM with REFUSED_STREAM (7).
        if kind == 0x3 && payload == 7u32.to_be_bytes() {
            refused += 1;
        }
        refused == 10
    });
    assert!(!closed && refused == 10, "18 - 8 streams refused ({refused}, closed: {closed})");
    // Meanwhile a probe is answered on a new connection, and the stuck
    // streams end when their request does not arrive in time.
    assert_eq!(check(hg.admin, &["liveness"])["liveness"], "SERVING");
    assert_eq!(hg.admin_get("/readyz").0, 200);
}

#[test]
fn a_bad_preface_or_a_silent_h2_client_leaves_the_admin_port_serving() {
    let hg = start("  header_read_timeout: 1s\n", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    // A broken preface is not HTTP/2: it is answered as a bad HTTP/1 request.
    let (status, _, _) = http_request(hg.admin, "PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n");
    assert!([0, 400, 505].contains(&status), "{status}");
    // Half a preface, then silence: closed after header_read_timeout.
    let mut half = TcpStream::connect_timeout(&hg.admin, support::STEP).unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    let started = Instant::now();
    assert!(read_frames(&mut half, WITHIN, |_, _| false), "closed");
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    // A full preface and no stream: an idle HTTP/2 connection is closed too.
    let mut idle = h2_connect(hg.admin);
    let mut goaway = false;
    assert!(read_frames(&mut idle, WITHIN, |kind, _| {
        goaway |= kind == 0x7;
        false
    }));
    assert!(goaway, "the idle connection was told GOAWAY");
    assert_eq!(check(hg.admin, &["", "startup"]), serde_json::json!({"": "SERVING", "startup": "SERVING"}));
}

#[test]
fn the_grpc_probes_component_renders_grpc_probes_that_a_live_healthgate_answers() {
    // An overlay of the native-sidecar example with the component, as a user writes it.
    let dir = tempfile::tempdir().unwrap();
    let up = "../".repeat(dir.path().components().count() - 1);
    let root = env!("CARGO_MANIFEST_DIR").trim_start_matches('/');
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {up}{root}/deploy/kubernetes\ncomponents:\n  - {up}{root}/deploy/kubernetes/grpc-probes\n"
        ),
    )
    .unwrap();
    let out = Command::new("kubectl").arg("kustomize").arg(dir.path()).output().expect("kubectl");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let pod = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
    let hg = pod["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "healthgate").unwrap();
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap()["data"]["healthgate.yaml"].as_str().unwrap();
    let mut services = Vec::new();
    for (probe, service) in
        [("startupProbe", "startup"), ("livenessProbe", "liveness"), ("readinessProbe", "readiness")]
    {
        let p = &hg[probe];
        assert!(p["httpGet"].is_null(), "{probe} still has an httpGet: {p}");
        assert_eq!(p["grpc"]["service"], service, "{probe}");
        let port = p["grpc"]["port"].as_u64().unwrap();
        assert!(config.contains(&format!(":{port}\"")), "{probe} port {port} is not admin.listen's in:\n{config}");
        services.push(service);
    }
    // Every service name the manifests use is one healthgate answers.
    let hg = start("", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    let got = check(hg.admin, &services);
    for s in services {
        assert_eq!(got[s], "SERVING", "{got}");
    }
}

#[test]
fn grpc_probes_answer_while_thousands_of_clients_hold_partial_requests() {
    let hg = start(
        "  max_connections: 32\n  header_read_timeout: 30s\n",
        &[dep("db", "out_of_service", support::always_up())],
    );
    hg.wait_state("in_service", WITHIN);
    let admin = hg.admin;
    // A third each: partial HTTP/1.1 heads, HTTP/2 prefaces with nothing
    // after them, half prefaces (the protocol not known yet).
    let flood = std::thread::spawn(move || {
        let mut held = Vec::new();
        for i in 0..2000 {
            if let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_secs(2)) {
                let bytes: &[u8] = match i % 3 {
                    0 => b"GET /readyz HTTP/1.1\r\nX-Slow: ",
                    1 => b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                    _ => b"PRI * HTTP/2.0\r\n",
                };
                let _ = s.write_all(bytes);
                held.push(s);
            }
        }
        held
    });
    let got: serde_json::Value = serde_json::from_str(&client(&["probes", &admin.to_string(), "40"])).unwrap();
    let held = flood.join().unwrap();
    assert!(held.len() >= 1500, "only {} clients connected", held.len());
    let slowest = got["max"].as_f64().unwrap();
    assert!(slowest < 2.0, "slowest gRPC probe took {slowest} s: {got}");
    // Shed connections are closed at once, silent ones included, not after
    // header_read_timeout (30 s here): the process holds about max_connections.
    let fds = support::eventually_blocking("shed connections closed", WITHIN, || {
        let n = std::fs::read_dir(format!("/proc/{}/fd", hg.pid())).unwrap().count();
        (n < 200).then_some(n)
    });
    eprintln!("gRPC probes during a flood of {} partial clients: {got}; {fds} fds open after", held.len());
}

#[test]
fn with_grpc_disabled_the_admin_port_speaks_http1_only() {
    let hg = start("  grpc:\n    enabled: false\n", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    assert_eq!(check(hg.admin, &[""])[""], "UNAVAILABLE", "no HTTP/2: the client cannot connect");
    assert_eq!(hg.admin_get("/readyz"), (200, "in_service\n".into()));
}

#[test]
fn an_operators_forced_verdict_reaches_check_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cr3t-token-0123456789abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let hg = start(
        &format!("  control:\n    token_file: {}\n", token_file.display()),
        &[dep("db", "out_of_service", support::always_up())],
    );
    hg.wait_state("in_service", WITHIN);
    let w = Watch::start(hg.admin, "db");
    assert_eq!(w.next(WITHIN).1, "SERVING");
    let body = r#"{"ttl":"1h","reason":"test"}"#;
    let (status, _, _) = http_request(
        hg.admin,
        &format!(
            "PUT /control/dependencies/db/down HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(status, 200);
    // The check still passes; the forced verdict is the one gating uses, and the one told.
    assert_eq!(check(hg.admin, &["db", ""]), serde_json::json!({"db": "NOT_SERVING", "": "NOT_SERVING"}));
    assert_eq!(w.next(WITHIN).1, "NOT_SERVING");
}

#[test]
fn random_frames_after_the_preface_never_stop_the_admin_port() {
    let hg = start("  header_read_timeout: 1s\n", &[dep("db", "out_of_service", support::always_up())]);
    hg.wait_state("in_service", WITHIN);
    // A fixed-seed xorshift: the same 150 cases every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for case in 0..150 {
        let mut s = h2_connect(hg.admin);
        let mut bytes = Vec::new();
        for _ in 0..(1 + next() % 6) {
            // Frame types 0-9 (DATA .. CONTINUATION), any flags, small stream ids,
            // payloads mostly well framed: HPACK and payload contents are noise.
            let kind = (next() % 10) as u8;
            let payload: Vec<u8> = (0..next() % 40).map(|_| next() as u8).collect();
            let stream = (next() % 6) as u32;
            bytes.extend(h2_frame(kind, next() as u8, stream, &payload));
            if kind == 1 && next() % 2 == 0 {
                bytes.extend(h2_frame(1, 0x5, 2 * stream + 1, &watch_head()));
            }
        }
        let _ = s.write_all(&bytes);
        let mut buf = Vec::new();
        let mut eof = false;
        let until = Instant::now() + Duration::from_millis(300);
        while !eof && Instant::now() < until {
            support::read_some(&mut s, &mut buf, &mut eof, Duration::from_millis(50));
        }
        if case % 50 == 49 {
            assert_eq!(check(hg.admin, &[""])[""], "SERVING", "after case {case}");
        }
    }
    assert_eq!(hg.admin_get("/livez").0, 200);
    assert_eq!(check(hg.admin, &["liveness", "db"]), serde_json::json!({"liveness": "SERVING", "db": "SERVING"}));
}
