//! End-to-end tests of the core against the real binary: probes in each
//! state, `/status`, `/metrics`, transition events, CLI exit codes, SIGTERM.
//!
//! Dependencies are plain TCP listeners the test opens and closes.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use support::Dep;
use support::healthgate::{Healthgate, binary};

/// A config with one HTTP listener and the given `(name, impact, address)` tcp dependencies.
fn config(deps: &[(&str, &str, SocketAddr)], extra: &str) -> String {
    let mut c = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\ndrain:\n  delay: 1s\n  timeout: 2s\n{extra}listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\ndependencies:\n"
    );
    for (name, impact, addr) in deps {
        c.push_str(&format!(
            "  - name: {name}\n    type: tcp\n    address: \"{addr}\"\n    impact: {impact}\n    interval: 100ms\n    timeout: 500ms\n    rise: 2\n    fall: 2\n"
        ));
    }
    c
}

const WITHIN: Duration = Duration::from_secs(10);

#[test]
fn probes_follow_the_service_state_and_liveness_never_depends_on_dependencies() {
    let (mut db, mut cache) = (Dep::up(), Dep::up());
    let hg = Healthgate::start(&config(&[("db", "out_of_service", db.addr), ("cache", "degraded", cache.addr)], ""));
    hg.wait_state("in_service", WITHIN);
    assert_eq!(hg.admin_get("/readyz"), (200, "in_service\n".into()));
    assert_eq!(hg.admin_get("/startupz").0, 200);
    assert_eq!(hg.admin_get("/livez"), (200, "ok\n".into()));

    cache.kill();
    hg.wait_state("degraded", WITHIN);
    assert_eq!(hg.admin_get("/readyz"), (200, "degraded\n".into()));

    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(hg.admin_get("/readyz"), (503, "out_of_service\n".into()));
    assert_eq!(hg.admin_get("/livez").0, 200, "liveness must not follow dependencies");
    assert_eq!(hg.admin_get("/startupz").0, 200, "startup stays done");

    db.revive();
    cache.revive();
    hg.wait_state("in_service", WITHIN);
    assert_eq!(hg.admin_get("/readyz").0, 200);
}

#[test]
fn startup_probe_and_readiness_fail_until_the_first_verdict() {
    // A server that accepts but never answers: the first verdict takes the whole timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\ndependencies:\n  - name: slow\n    type: tcp\n    address: \"{}\"\n    send: \"hello\"\n    expect: \"never\"\n    timeout: 3s\n",
        silent.local_addr().unwrap()
    );
    let hg = Healthgate::start(&cfg);
    assert_eq!(hg.state(), "starting");
    assert_eq!(hg.admin_get("/startupz").0, 503);
    assert_eq!(hg.admin_get("/readyz"), (503, "starting\n".into()));
    assert_eq!(hg.admin_get("/livez").0, 200);
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(hg.admin_get("/startupz").0, 200);
    let dep = &hg.status()["dependencies"][0];
    assert_eq!(dep["last_cause"], "read_timeout");
}

#[test]
fn readiness_can_stay_up_while_out_of_service_when_configured() {
    let mut db = Dep::up();
    let extra = "";
    let cfg = config(&[("db", "out_of_service", db.addr)], extra).replace(
        "admin:\n  listen: 127.0.0.1:0\n",
        "admin:\n  listen: 127.0.0.1:0\n  ready_when_out_of_service: true\n",
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(hg.admin_get("/readyz").0, 200);
}

#[test]
fn status_json_reports_each_dependency_and_listener() {
    let mut db = Dep::up();
    let hg = Healthgate::start(&config(&[("db", "out_of_service", db.addr)], ""));
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let s = hg.status();
    assert_eq!(s["service"]["state"], "out_of_service");
    assert_eq!(s["service"]["ready"], false);
    assert!(s["service"]["since"].as_str().unwrap().ends_with('Z'));
    let d = &s["dependencies"][0];
    assert_eq!(d["name"], "db");
    assert_eq!(d["type"], "tcp");
    assert_eq!(d["impact"], "out_of_service");
    assert_eq!(d["state"], "down");
    assert_eq!(d["last_cause"], "refused");
    assert!(d["last_message"].as_str().unwrap().contains("refused"));
    assert!(d["consecutive_failures"].as_u64().unwrap() >= 2);
    assert_eq!(d["consecutive_successes"], 0);
    assert!(d["last_latency_seconds"].as_f64().unwrap() >= 0.0);
    assert!(d["last_check"].is_string() && d["since"].is_string());
    let l = &s["listeners"][0];
    assert_eq!(l["name"], "web");
    assert_eq!(l["listen"], hg.listeners[0].to_string());
    assert_eq!(l["needs"], serde_json::json!(["db"]));
}

#[test]
fn metrics_export_dependency_state_failures_transitions_and_service_state() {
    let mut db = Dep::up();
    let hg = Healthgate::start(&config(&[("db", "out_of_service", db.addr)], ""));
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let (code, text) = hg.admin_get("/metrics");
    assert_eq!(code, 200);
    for needle in [
        "healthgate_dependency_up{dependency=\"db\",type=\"tcp\"} 0",
        "healthgate_check_failures_total{dependency=\"db\",cause=\"refused\"}",
        "healthgate_dependency_transitions_total{dependency=\"db\",to=\"down\"} 1",
        "healthgate_dependency_transitions_total{dependency=\"db\",to=\"up\"} 1",
        "healthgate_service_state{state=\"out_of_service\"} 1",
        "healthgate_service_state{state=\"in_service\"} 0",
        "healthgate_check_duration_seconds_bucket{",
        "healthgate_build_info{version=\"",
        "# TYPE healthgate_requests_total counter",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in /metrics:\n{text}");
    }
}

#[test]
fn each_transition_is_logged_once_not_each_probe() {
    let mut db = Dep::up();
    let hg = Healthgate::start(&config(&[("db", "out_of_service", db.addr)], ""));
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    // Let many more failing probes run (interval 100 ms).
    support::eventually_blocking("10 more failed checks", WITHIN, || {
        (hg.status()["dependencies"][0]["consecutive_failures"].as_u64().unwrap() >= 12).then_some(())
    });
    let down = hg.events("dependency down");
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0]["dependency"], "db");
    assert_eq!(down[0]["cause"], "refused");
    let oos = hg.events("OUT OF SERVICE");
    assert_eq!(oos.len(), 1, "{oos:?}");
    assert_eq!(oos[0]["level"], "ERROR");
    assert!(oos[0]["dependencies"].as_str().unwrap().contains("db(refused)"));
    db.revive();
    hg.wait_state("in_service", WITHIN);
    // Once at startup, once on recovery.
    assert_eq!(hg.events("IN SERVICE").len(), 2);
}

#[test]
fn sigterm_fails_readiness_at_once_keeps_serving_then_exits_zero() {
    let db = Dep::up();
    let cfg = config(&[("db", "out_of_service", db.addr)], "").replace("delay: 1s", "delay: 2s");
    let mut hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    hg.signal("TERM");
    support::eventually_blocking("readiness 503", Duration::from_secs(1), || {
        (hg.admin_get("/readyz") == (503, "draining\n".into())).then_some(())
    });
    // Still accepting on the data plane during the delay.
    assert!(std::net::TcpStream::connect(hg.listeners[0]).is_ok(), "listener must stay open during drain.delay");
    assert_eq!(hg.admin_get("/livez").0, 200);
    let status = hg.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_second_signal_exits_immediately() {
    let db = Dep::up();
    let cfg = config(&[("db", "out_of_service", db.addr)], "").replace("delay: 1s", "delay: 30s");
    let mut hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    hg.signal("TERM");
    support::eventually_blocking("draining", Duration::from_secs(2), || (hg.state() == "draining").then_some(()));
    hg.signal("INT");
    let status = hg.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(130));
}

fn write_config(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hg.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn validate_reports_every_problem_with_file_line_column_and_key_and_exits_2() {
    let (_d, path) = write_config(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: nowhere\ndependencies:\n  - name: db\n    type: tcp\n    address: db:3306\n    rise: 0\n",
    );
    let out = Command::new(binary()).arg("validate").arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(err.contains(&format!("{p}:4:15: listeners[0].upstream:")), "{err}");
    assert!(err.contains(&format!("{p}:9:11: dependencies[0].rise: must be between 1 and 100")), "{err}");
}

#[test]
fn validate_names_an_unknown_key_and_accepts_the_shipped_example() {
    let (_d, path) = write_config("workers: 1\nlisteners: []\ntimeout: 3s\n");
    let out = Command::new(binary()).arg("validate").arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3:1: timeout: unknown field `timeout`"), "{err}");
    let ok = Command::new(binary())
        .args(["validate", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn check_exits_0_in_service_1_otherwise_2_on_config_error() {
    let up = Dep::up();
    let mut down = Dep::up();
    down.kill();
    let run = |cfg: &str, json: bool| {
        let (_d, path) = write_config(cfg);
        let mut c = Command::new(binary());
        c.arg("check").arg("--config").arg(&path);
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let ok = run(&config(&[("db", "out_of_service", up.addr)], ""), false);
    assert_eq!(ok.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("service: in_service"));

    let bad = run(&config(&[("db", "out_of_service", up.addr), ("cache", "degraded", down.addr)], ""), true);
    assert_eq!(bad.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(v["service"], "degraded");
    assert_eq!(v["dependencies"][1]["cause"], "refused");
    assert_eq!(v["dependencies"][0]["up"], true);

    assert_eq!(run("listeners: 3\n", false).status.code(), Some(2));
}

#[test]
fn wait_returns_once_in_service_and_fails_after_its_timeout() {
    let mut dep = Dep::up();
    dep.kill();
    let (_d, path) = write_config(&config(&[("db", "out_of_service", dep.addr)], ""));
    let timed_out = Command::new(binary()).args(["wait", "--timeout", "1s", "--config"]).arg(&path).output().unwrap();
    assert_eq!(timed_out.status.code(), Some(1));

    let mut child = Command::new(binary()).args(["wait", "--timeout", "20s", "--config"]).arg(&path).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the dependency comes up later than wait starts
    dep.revive();
    let status = support::eventually_blocking("wait to exit", WITHIN, || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(0));
}
