//! Config reload through the real binary (docs/reload.md): under keep-alive
//! load no request is lost or answered under a mix of two configs; an
//! invalid file changes nothing and says where it is wrong; an unchanged
//! dependency keeps its check's connection; a ConfigMap-style `..data`
//! symlink swap is noticed by the file watch; the control API reloads with
//! its token and refuses a change that needs a restart, naming the key.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::app::App;
use support::healthgate::{Healthgate, http_request};
use support::relay::Relay;
use support::{STEP, always_up, eventually_blocking, free_port};
use tokio::io::BufReader;
use tokio::net::TcpStream;

/// Bound for a reload or a state change on a loaded 2-core machine.
const WITHIN: Duration = Duration::from_secs(15);

fn hash_of(text: &str) -> String {
    format!("{:014x}", healthgate::config::reload::hash(text))
}

/// The hash of the config in force, from `/status`.
fn hash_in_force(hg: &Healthgate) -> String {
    hg.status()["config"]["hash"].as_str().unwrap_or_default().to_string()
}

/// Writes `text` as the config and waits until it is in force (`/status` shows its hash).
fn reload_with(hg: &Healthgate, text: &str, how: &str) {
    std::fs::write(&hg.config, text).unwrap();
    if how == "HUP" {
        hg.signal("HUP");
    }
    let want = hash_of(text);
    eventually_blocking(&format!("config {want} in force"), WITHIN, || (hash_in_force(hg) == want).then_some(()));
}

/// The value of a metric series, e.g. `healthgate_config_reloads_total{result="failure"}`.
fn metric(hg: &Healthgate, series: &str) -> f64 {
    let (_, text) = hg.admin_get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series}"))
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"));
    (status, body)
}

// === Under load ===

/// Config A: `/gated` needs `down` (refused port, out_of_service) and is
/// answered 503 by healthgate; the listeners need `up1` (so the service is
/// out of service, yet everything but `/gated` is proxied).
/// Config B: `down` is gone, `extra` is added before `up1` (every bit
/// position moves), `/gated` needs nothing: the app answers it.
fn load_configs(app: SocketAddr, up1: SocketAddr, extra: SocketAddr, down: u16) -> (String, String) {
    let head = |needs: &str, gated: &str| {
        format!(
            "workers: 2\nreload:\n  poll_interval: 0s\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{app}\"\n    needs: [{needs}]\n    routes:\n      - name: gated\n        match: {{path_prefix: /gated}}\n        needs: [{gated}]\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: \"{app}\"\n    needs: [{needs}]\ndependencies:\n"
        )
    };
    let dep = |name: &str, addr: String| {
        format!(
            "  - name: {name}\n    type: tcp\n    address: \"{addr}\"\n    interval: 100ms\n    timeout: 300ms\n    rise: 1\n    fall: 1\n"
        )
    };
    let a =
        format!("{}{}{}", head("up1", "down"), dep("up1", up1.to_string()), dep("down", format!("127.0.0.1:{down}")));
    let b = format!("{}{}{}", head("up1, extra", ""), dep("extra", extra.to_string()), dep("up1", up1.to_string()));
    (a, b)
}

#[derive(Default)]
struct Tally {
    app: AtomicU64,
    rejected: AtomicU64,
    gated_app: AtomicU64,
    failures: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        let mut e = self.examples.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }
}

/// `/free/..` is always the app's; `/gated/..` the app's (config B) or the
/// 503 problem+json of config A. Anything else is a failure.
fn judge(tally: &Tally, path: &str, (status, headers, body): (u16, Vec<(String, String)>, Vec<u8>)) {
    if status == 200 && body == format!("app:GET {path}").as_bytes() {
        tally.app.fetch_add(1, Ordering::SeqCst);
        if path.starts_with("/gated") {
            tally.gated_app.fetch_add(1, Ordering::SeqCst);
        }
        return;
    }
    let problem = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let ctype = headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.as_str());
    if path.starts_with("/gated")
        && status == 503
        && ctype == Some("application/problem+json")
        && problem.is_some_and(|p| p["cause"] == "OUT OF SERVICE")
    {
        tally.rejected.fetch_add(1, Ordering::SeqCst);
        return;
    }
    tally.fail(format!("{path}: {status} {headers:?} {}", String::from_utf8_lossy(&body)));
}

/// `clients` keep-alive clients on `addr` until `stop`; HTTP-listener
/// clients alternate `/gated` and `/free`, TCP-listener ones ask `/free` only.
fn load(
    addr: SocketAddr,
    clients: usize,
    gated: bool,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for c in 0..clients {
                let (tally, stop) = (tally.clone(), stop.clone());
                tasks.spawn(async move {
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        if conn.is_none() {
                            match tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
                                Ok(Ok(s)) => conn = Some(BufReader::new(s)),
                                other => {
                                    tally.fail(format!("connect: {other:?}"));
                                    return;
                                }
                            }
                        }
                        n += 1;
                        let kind = if gated && n.is_multiple_of(2) { "gated" } else { "free" };
                        let path = format!("/{kind}/c{c}/r{n}");
                        match tokio::time::timeout(STEP, support::exchange(conn.as_mut().unwrap(), &path)).await {
                            Ok(Ok(r)) => {
                                let close =
                                    r.1.iter().any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
                                judge(&tally, &path, r);
                                if close {
                                    conn = None;
                                }
                            }
                            Ok(Err(e)) => {
                                tally.fail(format!("{path}: {e}"));
                                conn = None;
                            }
                            Err(_) => {
                                tally.fail(format!("{path}: no response within {STEP:?}"));
                                conn = None;
                            }
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
    })
}

#[test]
fn twenty_reloads_under_keep_alive_load_lose_no_request_and_each_answer_follows_one_config() {
    let app = App::start();
    let (up1, extra) = (always_up(), always_up());
    let (a, b) = load_configs(app.addr, up1, extra, free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, &a).unwrap();
    let hg = Healthgate::start_at(&path, &[]);
    hg.wait_state("out_of_service", WITHIN);
    let (http, tcp) = (hg.listeners[0], hg.listeners[1]);
    assert_eq!(get(http, "/gated/x").0, 503);

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [load(http, 16, true, tally.clone(), stop.clone()), load(tcp, 8, false, tally.clone(), stop.clone())];
    let mut took = Vec::new();
    for i in 0..20 {
        let (text, gated_status) = if i % 2 == 0 { (&b, 200) } else { (&a, 503) };
        let t = Instant::now();
        reload_with(&hg, text, "HUP");
        took.push(t.elapsed());
        // The config in force decides a new request at once.
        assert_eq!(get(http, "/gated/probe").0, gated_status, "reload {i}");
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::SeqCst);
    for l in loads {
        l.join().unwrap();
    }
    let failures = tally.failures.load(Ordering::SeqCst);
    let examples = tally.examples.lock().unwrap().clone();
    assert_eq!(failures, 0, "failed requests: {examples:#?}");
    let (ok, rejected, gated_app) = (
        tally.app.load(Ordering::SeqCst),
        tally.rejected.load(Ordering::SeqCst),
        tally.gated_app.load(Ordering::SeqCst),
    );
    assert!(rejected > 0 && gated_app > 0, "both configs served /gated: app {gated_app}, 503 {rejected}");
    assert_eq!(metric(&hg, "healthgate_config_reloads_total{result=\"success\"}"), 20.0);
    // `up1` is the same dependency in both: it never went through a transition.
    let up1_status =
        hg.status()["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == "up1").cloned().unwrap();
    assert_eq!(up1_status["state"], "up");
    assert_eq!(metric(&hg, "healthgate_dependency_transitions_total{dependency=\"up1\",to=\"down\"}"), 0.0);
    let slowest = took.iter().max().unwrap();
    eprintln!("answers: {ok} from the app, {rejected} short-circuited; slowest reload seen in force after {slowest:?}");
}

// === Invalid config ===

#[test]
fn an_invalid_config_changes_nothing_logs_its_position_and_counts_a_failure_until_fixed() {
    let app = App::start();
    let (up1, extra) = (always_up(), always_up());
    let (a, b) = load_configs(app.addr, up1, extra, free_port());
    let hg = Healthgate::start(&a);
    hg.wait_state("out_of_service", WITHIN);
    let before = hash_in_force(&hg);
    // Line 3 of the file: `poll_interval` misspelt.
    let broken = a.replacen("poll_interval", "poll_intervall", 1);
    std::fs::write(&hg.config, &broken).unwrap();
    hg.signal("HUP");
    eventually_blocking("the failure counted", WITHIN, || {
        (metric(&hg, "healthgate_config_reloads_total{result=\"failure\"}") == 1.0).then_some(())
    });
    assert_eq!(metric(&hg, "healthgate_config_last_reload_successful"), 0.0);
    let event = hg.events("config reload failed").pop().expect("a failure event");
    let error = event["error"].as_str().unwrap();
    let at = format!("{}:3:3: reload.poll_intervall: unknown field `poll_intervall`", hg.config.display());
    assert!(error.contains(&at), "{error}");
    // The old config is still in force and still gates.
    assert_eq!(hash_in_force(&hg), before);
    assert_eq!(get(hg.listeners[0], "/gated/x").0, 503);
    assert_eq!(hg.status()["config"]["last_reload"]["result"], "failure");
    // Fixed: the next reload applies it.
    reload_with(&hg, &b, "HUP");
    assert_eq!(get(hg.listeners[0], "/gated/x").0, 200);
    assert_eq!(metric(&hg, "healthgate_config_reloads_total{result=\"success\"}"), 1.0);
    assert_eq!(metric(&hg, "healthgate_config_last_reload_successful"), 1.0);
    assert!(metric(&hg, "healthgate_config_last_reload_success_timestamp_seconds") > 1.7e9);
    assert_eq!(format!("{:014x}", metric(&hg, "healthgate_config_hash") as u64), hash_of(&b));
}

// === Connections of the checks ===

/// An `http` dependency checks over one kept-alive connection: a relay in
/// front of its server counts the connections the check opens.
fn check_config(app: SocketAddr, kept: SocketAddr, changed: SocketAddr, changed_interval: &str, route: &str) -> String {
    format!(
        "workers: 1\nreload:\n  poll_interval: 0s\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{app}\"\n    routes:\n      - name: {route}\n        match: {{path_prefix: /{route}}}\n        needs: []\ndependencies:\n\
         \x20 - name: kept\n    type: http\n    url: \"http://{kept}/health\"\n    interval: 100ms\n    timeout: 1s\n\
         \x20 - name: changed\n    type: http\n    url: \"http://{changed}/health\"\n    interval: {changed_interval}\n    timeout: 1s\n"
    )
}

#[test]
fn an_unchanged_dependency_keeps_its_connection_verdict_and_counters_and_a_changed_one_reconnects_once() {
    let app = App::start();
    let (kept, changed) = (Relay::start(app.addr), Relay::start(app.addr));
    let a = check_config(app.addr, kept.addr, changed.addr, "100ms", "one");
    let hg = Healthgate::start(&a);
    hg.wait_state("in_service", WITHIN);
    let dep = |name: &str| {
        hg.status()["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == name).cloned().unwrap()
    };
    // A few checks in: each dependency's check holds one connection.
    eventually_blocking("three checks", WITHIN, || (dep("kept")["checks_total"].as_u64()? >= 3).then_some(()));
    assert_eq!((kept.accepted(), changed.accepted()), (1, 1));
    let (since, checks) = (dep("kept")["since"].clone(), dep("kept")["checks_total"].as_u64().unwrap());

    // New routes, and `changed` checked at another interval.
    reload_with(&hg, &check_config(app.addr, kept.addr, changed.addr, "150ms", "two"), "HUP");
    eventually_blocking("three more checks", WITHIN, || {
        (dep("kept")["checks_total"].as_u64()? >= checks + 3 && dep("changed")["checks_total"].as_u64()? >= 3)
            .then_some(())
    });
    let after = dep("kept");
    assert_eq!(kept.accepted(), 1, "the unchanged dependency opened a new connection");
    assert_eq!(after["since"], since, "the unchanged dependency's verdict was reset");
    assert_eq!(after["state"], "up");
    // The changed one closed its old connection and opened exactly one new one.
    assert_eq!(changed.accepted(), 2);
    eventually_blocking("old connection closed", WITHIN, || (changed.open() == 1).then_some(()));
    assert_eq!(dep("changed")["state"], "up", "a changed dependency keeps its verdict across its restart");
    assert_eq!(metric(&hg, "healthgate_dependency_transitions_total{dependency=\"changed\",to=\"down\"}"), 0.0);
}

// === ConfigMap symlink swap ===

/// Lays out a ConfigMap volume: `dir/..<ts>/config.yaml`, `..data -> ..<ts>`,
/// `config.yaml -> ..data/config.yaml`; a new version swaps `..data` with one rename.
fn configmap_version(dir: &Path, ts: &str, text: &str) {
    let version = dir.join(ts);
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join("config.yaml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(ts, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("config.yaml");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("..data/config.yaml", &link).unwrap();
    }
}

#[test]
fn a_configmap_style_data_symlink_swap_is_applied_within_the_poll_interval() {
    let app = App::start();
    let (up1, extra) = (always_up(), always_up());
    let (a, b) = load_configs(app.addr, up1, extra, free_port());
    let watch = |t: &str| t.replace("poll_interval: 0s", "poll_interval: 200ms");
    let (a, b) = (watch(&a), watch(&b));
    let dir = tempfile::tempdir().unwrap();
    configmap_version(dir.path(), "..2026_11_30_05_00_00.1", &a);
    let hg = Healthgate::start_at(&dir.path().join("config.yaml"), &[]);
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(get(hg.listeners[0], "/gated/x").0, 503);

    let t = Instant::now();
    configmap_version(dir.path(), "..2026_11_30_05_01_00.2", &b);
    let want = hash_of(&b);
    eventually_blocking("the new ConfigMap version in force", WITHIN, || (hash_in_force(&hg) == want).then_some(()));
    let took = t.elapsed();
    assert_eq!(get(hg.listeners[0], "/gated/x").0, 200);
    // The bound: one poll interval plus the reload itself (a TCP check's first
    // verdict, ≤ its 300 ms timeout) plus scheduling slack on a loaded machine.
    assert!(took < Duration::from_secs(5), "picked up after {took:?}");
    let event = hg.events("config reloaded").pop().expect("a reload event");
    assert_eq!(event["trigger"], "file_watch");
    assert_eq!(event["hash"], want.as_str());
    eprintln!("ConfigMap swap applied after {took:?} (poll interval 200ms)");
}

// === Control API ===

const TOKEN: &str = "s3cr3t-token-0123456789abcdef";

fn with_control(text: &str, token: &Path) -> String {
    text.replacen(
        "admin:\n  listen: 127.0.0.1:0\n",
        &format!("admin:\n  listen: 127.0.0.1:0\n  control:\n    token_file: {}\n", token.display()),
        1,
    )
}

fn post_reload(hg: &Healthgate, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = r#"{"by":"test","reason":"new routes"}"#;
    let raw = format!(
        "POST /control/reload HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, body) = http_request(hg.admin, &raw);
    (status, body)
}

#[test]
fn post_control_reload_needs_the_token_applies_the_file_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let app = App::start();
    let (a, b) = load_configs(app.addr, always_up(), always_up(), free_port());
    let (a, b) = (with_control(&a, &token), with_control(&b, &token));
    let hg = Healthgate::start(&a);
    hg.wait_state("out_of_service", WITHIN);
    std::fs::write(&hg.config, &b).unwrap();
    assert_eq!(post_reload(&hg, None).0, 401);
    assert_eq!(post_reload(&hg, Some("wrong-token-0123456789abcdef00")).0, 401);
    assert_ne!(hash_in_force(&hg), hash_of(&b), "an unauthenticated call reloaded");
    let (status, body) = post_reload(&hg, Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["hash"], hash_of(&b).as_str());
    assert_eq!(v["added"], serde_json::json!(["extra"]));
    assert_eq!(v["removed"], serde_json::json!(["down"]));
    assert_eq!(hash_in_force(&hg), hash_of(&b));
    assert_eq!(get(hg.listeners[0], "/gated/x").0, 200);
    let audit = hg.events("config reload requested").pop().expect("an audit event");
    assert_eq!((audit["by"].as_str(), audit["reason"].as_str()), (Some("test"), Some("new routes")));
}

#[test]
fn a_changed_listen_address_is_refused_naming_the_key_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let app = App::start();
    let (a, b) = load_configs(app.addr, always_up(), always_up(), free_port());
    let a = with_control(&a, &token);
    // B's routes, and the HTTP listener moved to another port.
    let moved = with_control(&b, &token).replacen(
        "listen: 127.0.0.1:0\n    upstream",
        &format!("listen: 127.0.0.1:{}\n    upstream", free_port()),
        1,
    );
    let hg = Healthgate::start(&a);
    hg.wait_state("out_of_service", WITHIN);
    std::fs::write(&hg.config, &moved).unwrap();
    let (status, body) = post_reload(&hg, Some(TOKEN));
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("listeners[0].listen") && body.contains("restart"), "{body}");
    assert_eq!(get(hg.listeners[0], "/gated/x").0, 503, "the routes of the refused config were applied");
    assert_eq!(metric(&hg, "healthgate_config_reloads_total{result=\"failure\"}"), 1.0);
}

/// A listener's timeouts and limits are applied by a reload to the requests
/// and connections that start after it: a shorter `upstream_response_timeout`
/// turns a slow answer into a 504, `via: false` drops the `Via` header, and
/// a lowered `max_connections` leaves a new connection waiting while the open
/// one holds the only permit (the open one is not closed for it).
#[test]
fn a_reload_applies_new_timeouts_and_limits_to_later_requests_and_connections() {
    let app = App::start();
    app.set_delay(Duration::from_millis(800));
    let config = |timeout: &str, max: usize, via: bool| {
        format!(
            "workers: 1\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    \
             upstream: {}\n    upstream_response_timeout: {timeout}\n    max_connections: {max}\n    via: {via}\n",
            app.addr
        )
    };
    let has_via = |addr| {
        let (_, head, _) = http_request(addr, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        head.to_ascii_lowercase().contains("\r\nvia: 1.1 healthgate")
    };
    let hg = Healthgate::start(&config("5s", 100, true));
    hg.wait_state("in_service", WITHIN);
    assert_eq!(get(hg.listeners[0], "/slow").0, 200, "within the first config's timeout");
    assert!(has_via(hg.listeners[0]), "Via with the first config");
    reload_with(&hg, &config("200ms", 1, false), "HUP");
    assert_eq!(get(hg.listeners[0], "/slow").0, 504, "the reloaded response timeout");
    app.set_delay(Duration::ZERO);
    assert!(!has_via(hg.listeners[0]), "via: false applied");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = hg.listeners[0];
    rt.block_on(async {
        // The open connection takes the one permit (a connection of the
        // 504 above may still hold it for a moment: connect until served).
        let mut first = BufReader::new(TcpStream::connect(addr).await.unwrap());
        let served = tokio::time::timeout(WITHIN, support::exchange(&mut first, "/one")).await;
        assert_eq!(served.expect("first connection served").expect("exchange").0, 200);
        let second = tokio::spawn(async move {
            let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
            support::exchange(&mut c, "/two").await
        });
        // Proving an absence: the second stays unanswered while the first is open.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!second.is_finished(), "a second connection was served beyond max_connections: 1");
        assert_eq!(support::exchange(&mut first, "/again").await.expect("first still open").0, 200);
        drop(first);
        let (status, ..) =
            tokio::time::timeout(WITHIN, second).await.expect("served once the permit is free").unwrap().unwrap();
        assert_eq!(status, 200);
    });
}

/// A TCP listener's `upstream` changed by a reload: new sessions go to the
/// new address, a session already open stays with the one it connected to.
#[test]
fn a_tcp_listeners_reloaded_upstream_takes_new_sessions_and_open_ones_stay() {
    use std::io::{Read, Write};
    // Each server answers every chunk with its name and the chunk.
    let server = |name: &'static [u8]| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        if s.write_all(&[name, &buf[..n]].concat()).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    };
    let (a, b) = (server(b"A"), server(b"B"));
    let config = |up: SocketAddr| {
        format!(
            "workers: 1\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: l4\n    protocol: tcp\n    \
             listen: 127.0.0.1:0\n    upstream: \"{up}\"\n"
        )
    };
    let ask = |s: &mut std::net::TcpStream| {
        s.write_all(b"?").unwrap();
        let mut reply = [0u8; 2];
        s.read_exact(&mut reply).expect("a reply through the listener");
        String::from_utf8_lossy(&reply).to_string()
    };
    let session = |addr| {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(STEP)).unwrap();
        s
    };
    let hg = Healthgate::start(&config(a));
    hg.wait_state("in_service", WITHIN);
    let mut open = session(hg.listeners[0]);
    assert_eq!(ask(&mut open), "A?");
    reload_with(&hg, &config(b), "HUP");
    assert_eq!(ask(&mut session(hg.listeners[0])), "B?", "a new session goes to the new upstream");
    assert_eq!(ask(&mut open), "A?", "the open session stays with its upstream");
}

#[test]
fn healthgate_ctl_reload_applies_the_file_and_exits_1_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let app = App::start();
    let (a, b) = load_configs(app.addr, always_up(), always_up(), free_port());
    let (a, b) = (with_control(&a, &token), with_control(&b, &token));
    let hg = Healthgate::start(&a);
    hg.wait_state("out_of_service", WITHIN);
    let ctl = |reason: &str| {
        let out = std::process::Command::new(support::healthgate::binary())
            .args(["ctl", "--admin", &hg.admin.to_string(), "--token-file"])
            .arg(&token)
            .args(["--config"])
            .arg(&hg.config)
            .args(["reload", "--reason", reason])
            .env_remove("HEALTHGATE_CONTROL_TOKEN")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    std::fs::write(&hg.config, &b).unwrap();
    let (code, out) = ctl("rollout 2");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(hash_in_force(&hg), hash_of(&b));
    std::fs::write(&hg.config, b.replacen("workers: 2", "workers: 1", 1)).unwrap();
    let (code, out) = ctl("fewer workers");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("workers") && out.contains("restart"), "{out}");
    assert_eq!(hash_in_force(&hg), hash_of(&b));
}

/// The ids of the Redis clients other than the one asking (`CLIENT LIST`).
fn redis_checker_ids(redis: &support::redis::Redis) -> Vec<String> {
    let list = redis.command(&["CLIENT", "LIST"]);
    let mut ids: Vec<String> = list
        .lines()
        .filter(|l| l.contains("id=") && !l.contains("cmd=client|list"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_string))
        .collect();
    ids.sort();
    ids
}

#[test]
fn an_unchanged_redis_dependency_keeps_the_same_server_side_connection_across_a_reload() {
    let redis = support::redis::Redis::start(&[]);
    let app = App::start();
    let config = |route: &str, extra: &str| {
        format!(
            "workers: 1\nreload:\n  poll_interval: 0s\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\n    routes:\n      - name: {route}\n        match: {{path_prefix: /{route}}}\n        needs: [cache]\ndependencies:\n  - name: cache\n    type: redis\n    address: \"{}\"\n    interval: 100ms\n    timeout: 1s\n{extra}",
            app.addr,
            redis.address()
        )
    };
    let hg = Healthgate::start(&config("one", ""));
    hg.wait_state("in_service", WITHIN);
    let checks = || {
        hg.status()["dependencies"].as_array().unwrap().iter().find(|d| d["name"] == "cache").unwrap()["checks_total"]
            .as_u64()
            .unwrap()
    };
    let before = redis_checker_ids(&redis);
    assert_eq!(before.len(), 1, "one checker connection: {before:?}");
    // Other routes and one more dependency: `cache` itself is unchanged.
    let extra = format!("  - name: other\n    type: tcp\n    address: \"{}\"\n    interval: 100ms\n", always_up());
    reload_with(&hg, &config("two", &extra), "HUP");
    let n = checks();
    eventually_blocking("more checks of cache", WITHIN, || (checks() >= n + 3).then_some(()));
    assert_eq!(redis_checker_ids(&redis), before, "the checker's Redis connection changed across the reload");
    assert_eq!(get(hg.listeners[0], "/two/x").0, 200);
}
