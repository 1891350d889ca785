//! What operators see: a real Prometheus (Debian's `prometheus`, started
//! here on a free loopback port with a temp dir and a generated scrape
//! config) scrapes two live healthgates ("pods" of one app) under load, and
//! every query of the shipped Grafana dashboard and every alert expression
//! of the shipped PrometheusRule must return finite values (no NaN, no
//! empty panel) through the HTTP API, in a scenario that exercises each: a
//! dependency down everywhere, one down on one pod only (which puts that pod
//! out of service), one flapping, one with slow checks, short-circuited and
//! proxied requests, an unreachable app, malformed requests, and a TCP
//! listener beside the HTTP ones. The OpenMetrics exposition Prometheus
//! negotiates must also pass a strict parser (Python's `prometheus_client`,
//! which `scripts/test.sh` installs with pip).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::app::App;
use support::healthgate::Healthgate;
use support::{Dep, STEP, always_up, eventually_blocking, free_port};

/// How long a query may take to show finite data once load is running.
const SETTLE: Duration = Duration::from_secs(30);

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

// === the scenario ===

/// A tcp dependency whose answer takes 600 ms: its checks are slow.
fn slow_dependency() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf);
                std::thread::sleep(Duration::from_millis(600));
                let _ = s.write_all(b"PONG\n");
            });
        }
    });
    addr
}

/// An echo server for the TCP listener.
fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    addr
}

/// One pod's config: `partial` is the address of a dependency that is up on
/// one pod and down on the other.
fn pod_config(
    app: SocketAddr,
    dead: SocketAddr,
    up: SocketAddr,
    partial: SocketAddr,
    flappy: SocketAddr,
    slow: SocketAddr,
    echo: SocketAddr,
) -> String {
    format!(
        r#"workers: 1
admin:
  listen: "127.0.0.1:0"
drain:
  delay: 100ms
  timeout: 1s
listeners:
  - name: web
    listen: "127.0.0.1:0"
    upstream: "{app}"
    needs: [up, partial]
    bypass: ["/healthz"]
    routes:
      - name: cart
        match:
          path_prefix: /cart
        needs: [down]
  - name: broken
    listen: "127.0.0.1:0"
    upstream: "{dead}"
    needs: []
  - name: l4
    protocol: tcp
    listen: "127.0.0.1:0"
    upstream: "{echo}"
    needs: [up]
dependencies:
  - name: up
    type: tcp
    address: "{up}"
    interval: 200ms
    rise: 1
    fall: 1
    slow_start:
      window: 10s
  - name: partial
    type: tcp
    address: "{partial}"
    interval: 200ms
    rise: 1
    fall: 1
  - name: down
    type: tcp
    address: "{dead}"
    impact: degraded
    interval: 200ms
    rise: 1
    fall: 1
  - name: flappy
    type: tcp
    address: "{flappy}"
    impact: observe
    interval: 100ms
    timeout: 300ms
    rise: 1
    fall: 1
  - name: slow
    type: tcp
    address: "{slow}"
    send: PING
    expect: PONG
    impact: observe
    interval: 200ms
    timeout: 2s
    rise: 1
    fall: 1
fleet:
  peers:
    static: ["{dead}"]
"#
    )
}

/// Sends every kind of request to a pod until `stop`: proxied (or
/// short-circuited on the pod that is out of service), short-circuited by
/// route, bypassed, to an unreachable app, malformed, and TCP sessions.
fn load(hg: &Healthgate, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let (web, broken, l4, admin) = (hg.listeners[0], hg.listeners[1], hg.listeners[2], hg.admin);
    std::thread::spawn(move || {
        for round in 0u64.. {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if round % 10 == 0 {
                // A gRPC call healthgate answers itself (short-circuited, or
                // UNIMPLEMENTED towards this HTTP/1.1 app) and a gRPC health
                // check on the admin port (an empty HealthCheckRequest).
                grpc_call(web, "/shop.Cart/Get");
                grpc_call(admin, "/grpc.health.v1.Health/Check");
            }
            for (addr, target) in
                [(web, "/"), (web, "/cart/1"), (web, "/healthz"), (broken, "/"), (web, "/../climbs-above-root")]
            {
                // Answers do not matter here, only that requests are made.
                let _ = get(addr, target, &[]);
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&l4, STEP) {
                let _ = s.set_read_timeout(Some(STEP));
                let _ = s.write_all(b"ping");
                let _ = s.read_exact(&mut [0u8; 4]);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// One unary gRPC call with an empty message, by curl over h2c; the answer does not matter.
fn grpc_call(addr: SocketAddr, path: &str) {
    let _ = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "2",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
        ])
        .args(["-H", "te: trailers", "--data-binary", "@-"])
        .arg(format!("http://{addr}{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("piped").write_all(&[0u8; 5])?;
            c.wait()
        });
}

// === Prometheus ===

/// A Prometheus server scraping the given admin addresses every second;
/// killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Each target gets the labels the ServiceMonitor would give it:
    /// `namespace`, `pod`, and `job` (all pods of one app share it).
    fn start(targets: &[(SocketAddr, &str)]) -> Prometheus {
        let binary = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .expect("prometheus not found: install Debian's `prometheus` package (scripts/test.sh does)");
        let dir = tempfile::tempdir().unwrap();
        let static_configs: Vec<Value> = targets
            .iter()
            .map(
                |(a, pod)| serde_json::json!({"targets": [a.to_string()], "labels": {"namespace": "shop", "pod": pod}}),
            )
            .collect();
        // JSON is YAML.
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "app", "scrape_interval": "1s", "scrape_timeout": "900ms", "static_configs": static_configs}],
        });
        std::fs::write(dir.path().join("prometheus.yml"), config.to_string()).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, addr, _dir: dir };
        eventually_blocking("prometheus ready", STEP, || {
            get(p.addr, "/-/ready", &[]).ok().filter(|(status, _)| *status == 200).map(|_| ())
        });
        p
    }

    /// An instant query: each sample's labels and value, or the API's error.
    fn query(&self, expr: &str) -> Result<Vec<(Value, f64)>, String> {
        let (status, body) = get(self.addr, &format!("/api/v1/query?query={}", encode(expr)), &[])
            .map_err(|e| format!("query failed: {e}"))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {v}"));
        }
        let value = |pair: &Value| pair[1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
        Ok(match v["data"]["resultType"].as_str() {
            Some("vector") => v["data"]["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["metric"].clone(), value(&s["value"])))
                .collect(),
            Some("scalar") => vec![(Value::Null, value(&v["data"]["result"]))],
            other => return Err(format!("unexpected result type {other:?}: {v}")),
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A blocking GET with `Connection: close`; returns (status, body).
fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, STEP)?;
    s.set_read_timeout(Some(STEP))?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(format!("bad response {text:?}")))?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

/// Polls `f` until it returns `Some` or `within` has passed.
fn eventually_blocking_opt<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        s = rest[size..].trim_start_matches("\r\n");
    }
    out
}

// === the shipped queries ===

/// Every PromQL expression of the dashboard: panel targets, and the series
/// selectors of its `label_values(...)` variables.
fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let here = m.get("title").and_then(Value::as_str).map_or(at.to_string(), |t| t.to_string());
                if let Some(e) = m.get("expr").and_then(Value::as_str) {
                    out.push((format!("panel {here}"), e.to_string()));
                }
                m.iter().filter(|(k, _)| *k != "expr").for_each(|(_, c)| walk(c, &here, out));
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, at, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(repo("deploy/grafana/healthgate-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    walk(&dash["panels"], "", &mut out);
    for var in dash["templating"]["list"].as_array().unwrap() {
        let q = var["query"].as_str().or_else(|| var["query"]["query"].as_str());
        if let Some(selector) = q.and_then(|q| q.strip_prefix("label_values(")).and_then(|r| r.rsplit_once(',')) {
            out.push((format!("variable {}", var["name"]), selector.0.to_string()));
        }
    }
    assert!(out.len() >= 15, "the dashboard has {} expressions", out.len());
    out
}

/// Every alert expression of the PrometheusRule.
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/kubernetes/common/prometheusrule.yaml")).unwrap();
    let doc: Value = serde_saphyr::from_str(&text).expect("PrometheusRule YAML");
    let mut out = Vec::new();
    for g in doc["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap().to_string();
            out.push((format!("alert {name}"), r["expr"].as_str().unwrap().to_string()));
        }
    }
    assert!(out.len() >= 7, "the PrometheusRule has {} rules", out.len());
    out
}

/// A dashboard query as Grafana sends it: every template variable set to
/// "All" and `$__rate_interval` to `rate_interval`.
fn instantiate(expr: &str, rate_interval: &str) -> String {
    let mut out = expr.replace("$__rate_interval", rate_interval);
    for var in ["$namespace", "$pod", "$dependency", "$listener"] {
        out = out.replace(var, ".*");
    }
    assert!(!out.contains('$'), "an unknown variable in {out}");
    out
}

/// Polls `expr` until it returns samples that are all finite.
fn finite(prom: &Prometheus, at: &str, expr: &str) -> Vec<(Value, f64)> {
    let started = Instant::now();
    loop {
        let r = prom.query(expr);
        match &r {
            Ok(samples) if !samples.is_empty() && samples.iter().all(|(_, v)| v.is_finite()) => {
                return samples.clone();
            }
            Err(e) if e.contains("parse error") || e.contains("bad_data") => panic!("{at}: {expr}: {e}"),
            _ => {}
        }
        if started.elapsed() > SETTLE {
            panic!("{at}: no finite data after {SETTLE:?}\n{expr}\nlast result: {r:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs the OpenMetrics exposition through `prometheus_client`'s strict parser.
fn strict_openmetrics_parse(exposition: &str) -> Result<String, String> {
    let script = "import sys\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        families = list(text_string_to_metric_families(sys.stdin.read()))\n\
        print(len(families))\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(text) }
}

#[test]
fn every_dashboard_query_and_alert_returns_finite_values_from_a_real_prometheus() {
    let app = App::start();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (up, slow, echo) = (always_up(), slow_dependency(), echo());
    let mut flappy = Dep::up();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = [up, dead]
        .into_iter()
        .enumerate()
        .map(|(i, partial)| {
            let file = dir.path().join(format!("pod-{i}.yaml"));
            std::fs::write(&file, pod_config(app.addr, dead, up, partial, flappy.addr, slow, echo)).unwrap();
            file
        })
        .collect();
    let pods: Vec<Healthgate> = files.iter().map(|f| Healthgate::start_at(f, &[])).collect();
    // A reload of a broken file on the second pod: the old config stays in
    // force and the reload-failure alert fires.
    std::fs::write(&files[1], "listeners: [oops\n").unwrap();
    pods[1].signal("HUP");
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = pods.iter().map(|hg| load(hg, stop.clone())).collect();
    let flapper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(300));
                flappy.kill();
                std::thread::sleep(Duration::from_millis(300));
                flappy.revive();
            }
        })
    };

    // The exposition Prometheus negotiates is OpenMetrics: a strict parser
    // must accept it (a `+Inf` bucket per histogram, `# EOF`, ...).
    let (status, om) =
        get(pods[0].admin, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]).unwrap();
    assert_eq!(status, 200);
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    assert!(om.contains("healthgate_request_duration_seconds_bucket{le=\"+Inf\""), "{om}");
    assert!(!om.contains("healthgate_requests_total{listener=\"l4\""), "a TCP listener exports request series:\n{om}");
    if let Err(e) = strict_openmetrics_parse(&om) {
        panic!(
            "the OpenMetrics exposition fails the strict parser (or python3 -m pip install prometheus-client is missing; scripts/test.sh installs it):\n{e}\n{om}"
        );
    }

    let prom = Prometheus::start(&[(pods[0].admin, "app-a"), (pods[1].admin, "app-b")]);
    eventually_blocking("both pods scraped", SETTLE, || {
        let up = prom.query("sum(up{job=\"app\"})").ok()?;
        (up.first()?.1 == 2.0).then_some(())
    });

    let mut checked = 0;
    for (at, expr) in dashboard_exprs() {
        for window in ["5s", "15s"] {
            finite(&prom, &at, &instantiate(&expr, window));
            checked += 1;
        }
    }
    for (at, expr) in alert_exprs() {
        // The scenario fires every alert: its expression (threshold
        // included) returns samples, all finite.
        let samples = finite(&prom, &at, &expr);
        eprintln!("{at}: {} sample(s), e.g. {:?}", samples.len(), samples[0]);
        checked += 1;
    }
    // The latency panels show a quantile per outcome that had requests
    // (polled: a scrape can miss an outcome's first requests on a busy box).
    let p99_expr =
        instantiate(&dashboard_exprs().iter().find(|(a, _)| a.contains("Request latency p99")).unwrap().1, "15s");
    let mut last = Vec::new();
    let all = eventually_blocking_opt(SETTLE, || {
        last = finite(&prom, "p99", &p99_expr);
        let outcomes: Vec<&str> = last.iter().filter_map(|(m, _)| m["outcome"].as_str()).collect();
        ["proxied", "short_circuited", "bypassed", "upstream_error", "bad_request"]
            .iter()
            .all(|o| outcomes.contains(o))
            .then_some(())
    });
    assert!(all.is_some(), "the p99 panel lacks an outcome that had requests: {last:?}");
    eprintln!("{checked} dashboard and alert queries returned finite values");

    stop.store(true, Ordering::SeqCst);
    for l in loads {
        l.join().unwrap();
    }
    flapper.join().unwrap();
}
