//! End-to-end: requests through the real binary are proxied or
//! short-circuited according to the dependencies' state (issues 2 and 10).

mod support;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use support::Dep;
use support::app::App;
use support::healthgate::{Healthgate, http_request};

const WITHIN: Duration = Duration::from_secs(10);

fn dep_yaml(name: &str, impact: &str, addr: SocketAddr) -> String {
    format!(
        "  - name: {name}\n    type: tcp\n    address: \"{addr}\"\n    impact: {impact}\n    interval: 100ms\n    timeout: 500ms\n    rise: 2\n    fall: 2\n"
    )
}

fn start(app: &App, listener_extra: &str, deps: &[String]) -> Healthgate {
    let cfg = format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\n{listener_extra}dependencies:\n{}",
        app.addr,
        deps.concat()
    );
    Healthgate::start(&cfg)
}

/// GET through healthgate: (status, head, body).
fn get(hg: &Healthgate, path: &str) -> (u16, String, String) {
    http_request(hg.listeners[0], &format!("GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn in_service_requests_reach_the_app() {
    let app = App::start();
    let db = Dep::up();
    let hg = start(&app, "", &[dep_yaml("db", "out_of_service", db.addr)]);
    hg.wait_state("in_service", WITHIN);
    let (status, _, body) = get(&hg, "/orders/1");
    assert_eq!((status, body.as_str()), (200, "app:GET /orders/1"));
}

#[test]
fn critical_dependency_down_gives_503_problem_json_and_the_app_never_sees_it() {
    let app = App::start();
    let mut db = Dep::up();
    let hg = start(&app, "", &[dep_yaml("db", "out_of_service", db.addr)]);
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let before = app.requests();
    let (status, head, body) = get(&hg, "/orders/1");
    assert_eq!(status, 503);
    assert_eq!(header(&head, "content-type"), Some("application/problem+json"));
    assert!(header(&head, "retry-after").is_some_and(|v| v.parse::<u64>().is_ok()), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"type":"about:blank","title":"Service Unavailable","status":503,"cause":"OUT OF SERVICE"})
    );
    assert_eq!(app.requests(), before, "a short-circuited request must not reach the app");
}

#[test]
fn degraded_dependency_down_gives_500_and_critical_keeps_precedence() {
    let app = App::start();
    let mut db = Dep::up();
    let mut cache = Dep::up();
    let hg = start(&app, "", &[dep_yaml("db", "out_of_service", db.addr), dep_yaml("cache", "degraded", cache.addr)]);
    hg.wait_state("in_service", WITHIN);
    cache.kill();
    hg.wait_state("degraded", WITHIN);
    let (status, head, body) = get(&hg, "/x");
    assert_eq!(status, 500);
    assert_eq!(header(&head, "content-type"), Some("application/problem+json"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"type":"about:blank","title":"Internal Server Error","status":500,"cause":"Internal Server Error"})
    );
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(get(&hg, "/x").0, 503);
}

#[test]
fn bypass_paths_are_proxied_during_an_outage_and_service_recovers_by_itself() {
    let app = App::start();
    let mut db = Dep::up();
    let hg = start(&app, "    bypass: [\"/healthz\"]\n", &[dep_yaml("db", "out_of_service", db.addr)]);
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(get(&hg, "/healthz").2, "app:GET /healthz");
    assert_eq!(get(&hg, "/healthz/deep").2, "app:GET /healthz/deep");
    assert_eq!(get(&hg, "/healthzz").0, 503, "bypass matches on segment boundaries");
    db.revive();
    hg.wait_state("in_service", WITHIN);
    assert_eq!(get(&hg, "/orders").0, 200);
}

#[test]
fn requests_before_the_first_verdict_get_503() {
    let app = App::start();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let dep = format!(
        "  - name: slow\n    type: tcp\n    address: \"{}\"\n    send: \"x\"\n    expect: \"never\"\n    timeout: 3s\n",
        silent.local_addr().unwrap()
    );
    let hg = start(&app, "", &[dep]);
    assert_eq!(hg.state(), "starting");
    let (status, _, body) = get(&hg, "/");
    assert_eq!(status, 503);
    assert!(body.contains("OUT OF SERVICE"));
}

#[test]
fn only_routes_that_need_the_down_dependency_are_short_circuited() {
    let app = App::start();
    let mut db = Dep::up();
    let mut redis = Dep::up();
    let routes = "    routes:\n      - name: cart\n        match: { path_prefix: /cart }\n        needs: [db, redis]\n      - name: static\n        match: { path_prefix: /static }\n        needs: []\n      - name: reports\n        match: { path_prefix: /api/reports, methods: [GET] }\n        needs: [db]\n";
    let hg =
        start(&app, routes, &[dep_yaml("db", "out_of_service", db.addr), dep_yaml("redis", "degraded", redis.addr)]);
    hg.wait_state("in_service", WITHIN);

    redis.kill();
    hg.wait_state("degraded", WITHIN);
    assert_eq!(get(&hg, "/cart/1").0, 500, "cart needs redis");
    assert_eq!(get(&hg, "/cartography").0, 500, "not the cart route: the default needs everything");
    assert_eq!(get(&hg, "/api/reports/7").0, 200, "reports needs only db");
    assert_eq!(get(&hg, "/static/app.js").0, 200);

    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    assert_eq!(get(&hg, "/cart/1").0, 503, "out of service wins over degraded");
    assert_eq!(get(&hg, "/api/reports/7").0, 503);
    assert_eq!(get(&hg, "/static/app.js").0, 200, "needs nothing: never short-circuited");

    let routes = &hg.status()["listeners"][0]["routes"];
    let admitted =
        |name: &str| routes.as_array().unwrap().iter().find(|r| r["name"] == name).unwrap()["admitted"].clone();
    assert_eq!(admitted("static"), true);
    assert_eq!(admitted("cart"), false);

    let metrics = hg.admin_get("/metrics").1;
    assert!(
        metrics.contains("healthgate_requests_total{listener=\"web\",outcome=\"short_circuited\",route=\"cart\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("healthgate_requests_total{listener=\"web\",outcome=\"proxied\",route=\"static\"} 2"));
}

#[test]
fn opt_in_problem_body_names_the_missing_dependencies() {
    let app = App::start();
    let mut db = Dep::up();
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\nshort_circuit:\n  expose_dependencies: true\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\ndependencies:\n{}",
        app.addr,
        dep_yaml("db", "out_of_service", db.addr)
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let v: serde_json::Value = serde_json::from_str(&get(&hg, "/").2).unwrap();
    assert_eq!(v["dependencies"], serde_json::json!(["db"]));
    assert_eq!(v["cause"], "OUT OF SERVICE");
}
