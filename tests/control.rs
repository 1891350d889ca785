//! Runtime control and the status page, against the real binary: the
//! authenticated control API (drain, maintenance, dependency overrides, TTL
//! expiry, audit, failure rate limit), `healthgate ctl`, the admin
//! connection cap under a flood of partial clients, and the status page
//! rendered by a real browser (headless Chromium).

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::app::App;
use support::healthgate::{Healthgate, binary, http_request};
use support::{Dep, eventually_blocking};

const WITHIN: Duration = Duration::from_secs(10);
const TOKEN: &str = "s3cr3t-token-0123456789abcdef";

/// A token file in `dir`.
fn token_file(dir: &Path) -> PathBuf {
    let f = dir.join("control-token");
    std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
    f
}

/// One HTTP listener in front of `app`, tcp dependencies `(name, impact, addr)`, extra admin keys.
fn config(app: SocketAddr, deps: &[(&str, &str, SocketAddr)], admin_extra: &str) -> String {
    let mut c = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\n{admin_extra}listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{app}\"\ndependencies:\n"
    );
    for (name, impact, addr) in deps {
        c.push_str(&format!(
            "  - name: {name}\n    type: tcp\n    address: \"{addr}\"\n    impact: {impact}\n    interval: 100ms\n    timeout: 500ms\n    rise: 1\n    fall: 1\n"
        ));
    }
    c
}

fn control_block(token: &Path) -> String {
    format!("  control:\n    token_file: {}\n    max_ttl: 1h\n", token.display())
}

/// Sends a request to the admin port with an optional bearer token and JSON body.
fn call(hg: &Healthgate, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, body) = http_request(hg.admin, &raw);
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
}

/// The value of a metric line, e.g. `healthgate_overrides_active{kind="drain"}`.
fn metric(hg: &Healthgate, series: &str) -> f64 {
    let (_, text) = hg.admin_get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series}"))
}

fn all_logs(hg: &Healthgate) -> String {
    hg.logs.lock().unwrap().join("\n")
}

#[test]
fn without_a_token_file_the_control_endpoints_do_not_exist() {
    let (app, db) = (App::start(), Dep::up());
    let hg = Healthgate::start(&config(app.addr, &[("db", "out_of_service", db.addr)], ""));
    hg.wait_state("in_service", WITHIN);
    assert_eq!(call(&hg, "PUT", "/control/drain", Some(TOKEN), r#"{"ttl":"1m","reason":"x"}"#).0, 404);
    assert_eq!(call(&hg, "GET", "/control", None, "").0, 404);
    assert_eq!(hg.admin_get("/readyz").0, 200);
    assert_eq!(hg.status()["control_enabled"], false);
}

#[test]
fn a_missing_or_wrong_token_gets_401_without_detail_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (app, db) = (App::start(), Dep::up());
    let hg = Healthgate::start(&config(
        app.addr,
        &[("db", "out_of_service", db.addr)],
        &control_block(&token_file(dir.path())),
    ));
    hg.wait_state("in_service", WITHIN);
    let body = r#"{"ttl":"1m","reason":"x"}"#;
    let wrong = "wrong-token-0123456789abcdef00";
    assert_eq!(call(&hg, "PUT", "/control/maintenance", None, body), (401, "unauthorized\n".into()));
    assert_eq!(call(&hg, "PUT", "/control/maintenance", Some(wrong), body), (401, "unauthorized\n".into()));
    // A near miss (one byte short) is as wrong as anything else.
    assert_eq!(call(&hg, "PUT", "/control/maintenance", Some(&TOKEN[..TOKEN.len() - 1]), body).0, 401);
    assert_eq!(hg.admin_get("/readyz").0, 200);
    assert_eq!(get(hg.listeners[0], "/x").0, 200);
    assert!(hg.status()["overrides"]["mode"].is_null());
    eventually_blocking("failure audit events", WITHIN, || {
        (hg.events("authentication failed").len() == 3).then_some(())
    });
    let logs = all_logs(&hg);
    assert!(!logs.contains(TOKEN) && !logs.contains(wrong) && !logs.contains(&TOKEN[..TOKEN.len() - 1]), "{logs}");
    assert_eq!(metric(&hg, "healthgate_control_auth_failures_total"), 3.0);
}

#[test]
fn drain_fails_readiness_keeps_proxying_and_ends_within_a_second_of_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let (app, db) = (App::start(), Dep::up());
    let hg = Healthgate::start(&config(
        app.addr,
        &[("db", "out_of_service", db.addr)],
        &control_block(&token_file(dir.path())),
    ));
    hg.wait_state("in_service", WITHIN);
    let (status, body) =
        call(&hg, "PUT", "/control/drain", Some(TOKEN), r#"{"ttl":"2s","reason":"node upgrade","by":"alice"}"#);
    let set_at = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert_eq!(hg.admin_get("/readyz"), (503, "draining\n".into()));
    let (code, _, body) = get(hg.listeners[0], "/orders");
    assert_eq!((code, body.as_str()), (200, "app:GET /orders"));
    let s = hg.status();
    assert_eq!(s["overrides"]["mode"]["mode"], "drain");
    assert_eq!(s["overrides"]["mode"]["by"], "alice");
    assert_eq!(s["overrides"]["mode"]["reason"], "node upgrade");
    assert!(s["overrides"]["mode"]["expires_at"].is_string());
    assert_eq!(metric(&hg, "healthgate_overrides_active{kind=\"drain\"}"), 1.0);

    eventually_blocking("drain to expire", WITHIN, || (hg.admin_get("/readyz").0 == 200).then_some(()));
    let ended = set_at.elapsed();
    assert!(ended < Duration::from_secs(3), "drain of 2s ended after {ended:?}");
    assert!(ended >= Duration::from_millis(1900), "drain of 2s ended early, after {ended:?}");
    assert!(hg.status()["overrides"]["mode"].is_null());
    assert_eq!(metric(&hg, "healthgate_overrides_active{kind=\"drain\"}"), 0.0);
    let set = hg.events("control: drain set");
    assert_eq!(set.len(), 1);
    assert_eq!(
        (set[0]["by"].as_str(), set[0]["reason"].as_str(), set[0]["ttl"].as_str()),
        (Some("alice"), Some("node upgrade"), Some("2s"))
    );
    eventually_blocking("expiry audit event", WITHIN, || {
        (hg.events("control: drain expired").len() == 1).then_some(())
    });
    assert!(!all_logs(&hg).contains(TOKEN));
}

#[test]
fn maintenance_answers_requests_503_with_its_own_body_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let (app, db) = (App::start(), Dep::up());
    let hg = Healthgate::start(&config(
        app.addr,
        &[("db", "out_of_service", db.addr)],
        &control_block(&token_file(dir.path())),
    ));
    hg.wait_state("in_service", WITHIN);
    let before = app.requests();
    assert_eq!(
        call(&hg, "POST", "/control/maintenance", Some(TOKEN), r#"{"ttl":"10m","reason":"schema migration"}"#).0,
        200
    );
    assert_eq!(hg.admin_get("/readyz"), (503, "maintenance\n".into()));
    let (code, head, body) = get(hg.listeners[0], "/orders");
    assert_eq!(code, 503);
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["cause"], "MAINTENANCE");
    assert_eq!(app.requests(), before, "the app saw a request during maintenance");
    assert_eq!(hg.status()["service"]["state"], "maintenance");
    assert_eq!(hg.status()["listeners"][0]["routes"][0]["admitted"], false);

    let (status, body) = call(&hg, "DELETE", "/control/mode", Some(TOKEN), r#"{"by":"bob","reason":"done"}"#);
    assert_eq!(
        (status, serde_json::from_str::<serde_json::Value>(&body).unwrap()["cleared"].as_str()),
        (200, Some("maintenance"))
    );
    assert_eq!(hg.admin_get("/readyz").0, 200);
    assert_eq!(get(hg.listeners[0], "/orders").0, 200);
    let cleared = hg.events("control: maintenance cleared");
    assert_eq!((cleared.len(), cleared[0]["by"].as_str()), (1, Some("bob")));
}

#[test]
fn a_dependency_override_wins_over_its_check_which_stays_visible_and_expiry_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let (app, mut db) = (App::start(), Dep::up());
    let hg = Healthgate::start(&config(
        app.addr,
        &[("db", "out_of_service", db.addr)],
        &control_block(&token_file(dir.path())),
    ));
    hg.wait_state("in_service", WITHIN);

    // Forced down while the check passes: requests are shed.
    assert_eq!(
        call(&hg, "PUT", "/control/dependencies/db/down", Some(TOKEN), r#"{"ttl":"2s","reason":"shed load"}"#).0,
        200
    );
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(get(hg.listeners[0], "/").0, 503);
    let d = &hg.status()["dependencies"][0];
    assert_eq!(
        (d["state"].as_str(), d["checked_state"].as_str(), d["forced"].as_str()),
        (Some("down"), Some("up"), Some("down"))
    );
    assert_eq!(hg.status()["overrides"]["dependencies"][0]["dependency"], "db");
    assert_eq!(metric(&hg, "healthgate_overrides_active{kind=\"dependency_down\"}"), 1.0);
    // Expiry gives the verdict back to the check.
    hg.wait_state("in_service", WITHIN);
    assert!(hg.status()["dependencies"][0]["forced"].is_null());
    eventually_blocking("override expiry event", WITHIN, || {
        (hg.events("dependency override expired").len() == 1).then_some(())
    });

    // Forced up while the check fails: requests are proxied again.
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(
        call(&hg, "PUT", "/control/dependencies/db/up", Some(TOKEN), r#"{"ttl":"10m","reason":"check is wrong"}"#).0,
        200
    );
    hg.wait_state("in_service", WITHIN);
    assert_eq!(get(hg.listeners[0], "/").0, 200);
    let d = &hg.status()["dependencies"][0];
    assert_eq!(
        (d["state"].as_str(), d["checked_state"].as_str(), d["last_ok"].as_bool()),
        (Some("up"), Some("down"), Some(false))
    );
    assert_eq!(call(&hg, "DELETE", "/control/dependencies/db", Some(TOKEN), "").0, 200);
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(hg.events("control: dependency forced down").len(), 1);
    assert_eq!(hg.events("control: dependency forced up").len(), 1);
    assert_eq!(hg.events("dependency override cleared").len(), 1);
}

#[test]
fn a_ttl_is_mandatory_and_bounded_and_unknown_targets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (app, db) = (App::start(), Dep::up());
    let hg = Healthgate::start(&config(
        app.addr,
        &[("db", "out_of_service", db.addr)],
        &control_block(&token_file(dir.path())),
    ));
    hg.wait_state("in_service", WITHIN);
    let (s, body) = call(&hg, "PUT", "/control/drain", Some(TOKEN), r#"{"reason":"x"}"#);
    assert_eq!(s, 400);
    assert!(body.contains("ttl is required"), "{body}");
    assert_eq!(call(&hg, "PUT", "/control/drain", Some(TOKEN), r#"{"ttl":"2h","reason":"x"}"#).0, 400);
    assert_eq!(call(&hg, "PUT", "/control/drain", Some(TOKEN), r#"{"ttl":"5m"}"#).0, 400);
    assert_eq!(call(&hg, "PUT", "/control/dependencies/nope/up", Some(TOKEN), r#"{"ttl":"5m","reason":"x"}"#).0, 404);
    assert_eq!(
        call(&hg, "PUT", "/control/dependencies/db/sideways", Some(TOKEN), r#"{"ttl":"5m","reason":"x"}"#).0,
        404
    );
    assert_eq!(hg.admin_get("/readyz").0, 200);
    assert!(hg.status()["overrides"]["mode"].is_null());
}

#[test]
fn repeated_authentication_failures_are_rate_limited_and_the_token_file_is_reread() {
    let dir = tempfile::tempdir().unwrap();
    let (app, db) = (App::start(), Dep::up());
    let file = token_file(dir.path());
    let hg = Healthgate::start(&config(app.addr, &[("db", "out_of_service", db.addr)], &control_block(&file)));
    hg.wait_state("in_service", WITHIN);
    let codes: Vec<u16> = (0..20).map(|_| call(&hg, "GET", "/control", Some("guess-0123456789abcdef"), "").0).collect();
    assert_eq!(codes.iter().filter(|c| **c == 401).count(), 10, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 10, "{codes:?}");
    // While limited even the right token is not checked; a second later it is.
    assert_eq!(call(&hg, "GET", "/control", Some(TOKEN), "").0, 429);
    eventually_blocking("the limit to refill", WITHIN, || {
        (call(&hg, "GET", "/control", Some(TOKEN), "").0 == 200).then_some(())
    });
    assert!(hg.events("authentication failed").len() <= 11);

    // A rotated Secret: the new token works, the old one no longer does.
    let rotated = "rotated-token-abcdef0123456789";
    std::fs::write(dir.path().join("new"), rotated).unwrap();
    std::fs::rename(dir.path().join("new"), &file).unwrap();
    assert_eq!(call(&hg, "GET", "/control", Some(rotated), "").0, 200);
    assert_eq!(call(&hg, "GET", "/control", Some(TOKEN), "").0, 401);
}

fn ctl(hg: &Healthgate, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(binary());
    cmd.arg("ctl").arg("--admin").arg(hg.admin.to_string()).args(args).env_remove("HEALTHGATE_CONTROL_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.code().unwrap_or(-1), s(&out.stdout), s(&out.stderr))
}

#[test]
fn healthgate_ctl_drains_overrides_and_resumes_through_the_admin_port() {
    let dir = tempfile::tempdir().unwrap();
    let (app, db) = (App::start(), Dep::up());
    let file = token_file(dir.path());
    let hg = Healthgate::start(&config(app.addr, &[("db", "out_of_service", db.addr)], &control_block(&file)));
    hg.wait_state("in_service", WITHIN);
    let tf = file.to_str().unwrap();

    let (code, out, err) =
        ctl(&hg, &["--token-file", tf, "--by", "carol", "drain", "--ttl", "10m", "--reason", "rollout"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(hg.admin_get("/readyz").0, 503);
    let (code, out, _) = ctl(&hg, &["status"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("service: draining") && out.contains("override: pod drain by carol"), "{out}");
    // The token from the environment, as a Secret mounted as a variable.
    let (code, out, err) = ctl(
        &hg,
        &["override", "db", "down", "--ttl", "1m", "--reason", "drill"],
        &[("HEALTHGATE_CONTROL_TOKEN", TOKEN)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(hg.status()["dependencies"][0]["forced"], "down");
    assert_eq!(ctl(&hg, &["--token-file", tf, "clear", "db"], &[]).0, 0);
    assert_eq!(ctl(&hg, &["--token-file", tf, "resume", "--reason", "done"], &[]).0, 0);
    assert_eq!(hg.admin_get("/readyz").0, 200);
    // Refused by the server: exit 1; a TTL over the maximum: exit 1 with the reason.
    let (code, _, err) =
        ctl(&hg, &["drain", "--ttl", "1m", "--reason", "x"], &[("HEALTHGATE_CONTROL_TOKEN", "wrong-0123456789abcdef")]);
    assert_eq!((code, err.as_str()), (1, "unauthorized\n"));
    let (code, _, err) = ctl(&hg, &["--token-file", tf, "drain", "--ttl", "30d", "--reason", "x"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("at most 1h"), "{err}");
    // No token anywhere: exit 2 before any request.
    let (code, _, err) = ctl(&hg, &["--config", "/nonexistent.yaml", "drain", "--ttl", "1m", "--reason", "x"], &[]);
    assert_eq!(code, 2, "{err}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn probes_answer_while_thousands_of_clients_hold_partial_requests_on_the_admin_port() {
    let (app, db) = (App::start(), Dep::up());
    let hg = Healthgate::start(&config(
        app.addr,
        &[("db", "out_of_service", db.addr)],
        "  max_connections: 32\n  header_read_timeout: 30s\n",
    ));
    hg.wait_state("in_service", WITHIN);
    let baseline = rss_kib(hg.pid());
    let admin = hg.admin;
    let flood = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..2500 {
            if let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_secs(2)) {
                let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                held.push(s);
            }
        }
        held
    });
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while !flood.is_finished() || probes < 20 {
        let t = Instant::now();
        let (code, body) = hg.admin_get("/readyz");
        assert_eq!((code, body.as_str()), (200, "in_service\n"));
        slowest = slowest.max(t.elapsed());
        probes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = flood.join().unwrap();
    assert!(held.len() >= 2000, "only {} clients connected", held.len());
    assert!(slowest < Duration::from_secs(1), "slowest probe took {slowest:?}");
    let rss = rss_kib(hg.pid());
    assert!(rss < baseline + 16 * 1024, "RSS grew from {baseline} KiB to {rss} KiB");
    assert!(metric(&hg, "healthgate_admin_connections_shed_total") >= 2000.0 - 32.0);
    eprintln!("{probes} probes, slowest {slowest:?}; RSS {baseline} -> {rss} KiB with {} clients", held.len());
}

// === The status page in a real browser ===

/// A fake Redis that answers every command with an error reply carrying markup.
fn hostile_redis(reply: &'static str) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(reply.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Runs headless Chromium on `url` with extra arguments; returns stdout.
fn chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium (Debian package `chromium`; scripts/test.sh installs it)");
    let out = eventually_blocking("chromium to finish", Duration::from_secs(60), || child.try_wait().unwrap());
    assert!(out.success(), "chromium failed: {out:?}");
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    stdout
}

#[test]
fn the_status_page_renders_in_a_browser_with_banner_rows_override_and_hostile_text_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let (app, db, queue) = (App::start(), Dep::up(), Dep::up());
    let redis = hostile_redis("-ERR <script>document.title='pwned'</script><img src=x onerror=alert(1)>\r\n");
    let token = token_file(dir.path());
    let yaml = format!(
        "{}  - name: cache\n    type: redis\n    address: \"{redis}\"\n    impact: degraded\n    interval: 100ms\n    timeout: 500ms\n    rise: 1\n    fall: 1\n",
        config(
            app.addr,
            &[("db", "out_of_service", db.addr), ("queue", "out_of_service", queue.addr)],
            &control_block(&token)
        )
    );
    let hg = Healthgate::start(&yaml);
    hg.wait_state("degraded", WITHIN);
    drop(queue);
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(
        call(
            &hg,
            "PUT",
            "/control/dependencies/queue/up",
            Some(TOKEN),
            r#"{"ttl":"30m","reason":"broker failover drill","by":"alice"}"#
        )
        .0,
        200
    );
    hg.wait_state("degraded", WITHIN);
    // A few checks for the sparklines.
    std::thread::sleep(Duration::from_millis(600));

    let (code, head, _) = get(hg.admin, "/");
    assert_eq!(code, 200);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'; style-src 'nonce-"), "{head}");

    let url = format!("http://{}/", hg.admin);
    let dom = chromium(&url, &["--dump-dom", "--virtual-time-budget=2000"]);
    assert!(dom.contains(r#"id="banner" class="banner warn" data-state="degraded""#), "{dom}");
    assert!(dom.contains("<h1>DEGRADED</h1>"), "{dom}");
    assert_eq!(dom.matches(r#"<tr class="dep""#).count(), 3, "{dom}");
    for name in ["db", "queue", "cache"] {
        assert!(dom.contains(&format!(r#"data-dep="{name}""#)), "{name} row missing: {dom}");
    }
    assert!(
        dom.contains(r#"id="overrides""#) && dom.contains("queue forced up") && dom.contains("broker failover drill"),
        "{dom}"
    );
    assert!(dom.contains("check says down"), "{dom}");
    // The server's markup is text: no element came from it, the title is intact.
    assert!(
        dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"),
        "{dom}"
    );
    assert!(!dom.contains("<script") && !dom.contains("<img"), "{dom}");
    assert!(dom.contains("<title>DEGRADED · healthgate</title>"), "{dom}");
    assert!(dom.contains("<svg class=\"spark\""), "{dom}");

    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for (name, size) in [("status-page.png", "1200,760"), ("status-page-phone.png", "390,1400")] {
        let shot = out.join(name);
        let _ = std::fs::remove_file(&shot);
        chromium(
            &url,
            &[
                &format!("--screenshot={}", shot.display()),
                &format!("--window-size={size}"),
                "--virtual-time-budget=2000",
            ],
        );
        let png = std::fs::read(&shot).expect("screenshot written");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
        eprintln!("screenshot: {}", shot.display());
    }
}
