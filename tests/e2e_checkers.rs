//! End-to-end through the proxy with real protocol checks: MySQL down → 503,
//! Redis down → 500, RabbitMQ down → 503; each recovers by itself. The
//! servers are private instances started by the tests.

mod support;

use std::time::Duration;

use support::app::App;
use support::healthgate::{Healthgate, http_request};

const WITHIN: Duration = Duration::from_secs(20);

fn start(app: &App, dependency: &str, env: &[(&str, &str)]) -> Healthgate {
    let cfg = format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\ndependencies:\n{dependency}    interval: 200ms\n    timeout: 1s\n    rise: 2\n    fall: 2\n",
        app.addr
    );
    Healthgate::start_with_env(&cfg, env)
}

/// Status and parsed problem body (if any) of a GET through healthgate.
fn get(hg: &Healthgate) -> (u16, serde_json::Value) {
    let (status, _, body) =
        http_request(hg.listeners[0], "GET /orders HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_down_gives_503_out_of_service_and_recovers() {
    let mut db = support::mariadb::MariaDb::start().await;
    let app = App::start();
    let dep = format!(
        "  - name: db\n    type: mysql\n    address: \"{}\"\n    user: {}\n    password_env: HG_DB_PASSWORD\n",
        db.address(),
        support::mariadb::USER
    );
    let hg = start(&app, &dep, &[("HG_DB_PASSWORD", support::mariadb::PASSWORD)]);
    hg.wait_state("in_service", WITHIN);
    assert_eq!(get(&hg).0, 200);
    let status = hg.admin_get("/status").1;
    assert!(!status.contains(support::mariadb::PASSWORD), "the password must never appear in /status");

    db.kill();
    hg.wait_state("out_of_service", WITHIN);
    let (code, body) = get(&hg);
    assert_eq!(code, 503);
    assert_eq!(body["cause"], "OUT OF SERVICE");
    assert_eq!(hg.status()["dependencies"][0]["last_cause"], "refused");

    db.start_again().await;
    hg.wait_state("in_service", WITHIN);
    assert_eq!(get(&hg).0, 200);
    let logs = hg.logs.lock().unwrap().join("\n");
    assert!(!logs.contains(support::mariadb::PASSWORD), "the password must never be logged");
}

#[test]
fn redis_down_gives_500_internal_server_error_and_recovers() {
    let mut redis = support::redis::Redis::start(&[]);
    let app = App::start();
    // No `impact:`: a Redis dependency is `degraded` by default.
    let dep = format!("  - name: cache\n    type: redis\n    address: \"{}\"\n", redis.address());
    let hg = start(&app, &dep, &[]);
    hg.wait_state("in_service", WITHIN);
    assert_eq!(get(&hg).0, 200);

    redis.kill();
    hg.wait_state("degraded", WITHIN);
    let (code, body) = get(&hg);
    assert_eq!(code, 500);
    assert_eq!(body["cause"], "Internal Server Error");

    redis.restart();
    hg.wait_state("in_service", WITHIN);
    assert_eq!(get(&hg).0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_down_gives_503_out_of_service_and_recovers() {
    let node = support::rabbitmq::node();
    let _only_us = support::rabbitmq::exclusive().await;
    let app = App::start();
    let dep = format!("  - name: broker\n    type: amqp\n    url: \"{}\"\n", node.url("guest", ""));
    let hg = tokio::task::block_in_place(|| start(&app, &dep, &[]));
    tokio::task::block_in_place(|| {
        hg.wait_state("in_service", WITHIN);
        assert_eq!(get(&hg).0, 200);
        let stopped = node.stop_app();
        hg.wait_state("out_of_service", WITHIN);
        let (code, body) = get(&hg);
        assert_eq!(code, 503);
        assert_eq!(body["cause"], "OUT OF SERVICE");
        stopped.start();
        hg.wait_state("in_service", Duration::from_secs(60));
        assert_eq!(get(&hg).0, 200);
    });
}
