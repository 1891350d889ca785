//! `type: amqp` against a real, private RabbitMQ node (see support/rabbitmq.rs).
//!
//! All tests share one node (boot is slow); tests that freeze, stop or alarm
//! it hold the exclusive lock, the others the shared one.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use healthgate::check::amqp::AmqpCheck;
use healthgate::check::{Cause, Check, CheckError};
use healthgate::config::{Config, DependencyKind};
use tokio::time::Instant;

use support::rabbitmq::{self, PASSWORD, USER};
use support::{STEP, eventually, free_port};

/// The check timeout every test config uses (generous: CI machines are shared and slow).
const TIMEOUT: Duration = Duration::from_secs(2);
/// Scheduling slack allowed on top of the timeout.
const GRACE: Duration = Duration::from_millis(300);

fn password_file() -> PathBuf {
    let node = rabbitmq::node();
    let path = node.dir().join("password");
    if !path.exists() {
        std::fs::write(&path, format!("{PASSWORD}\n")).unwrap();
    }
    path
}

/// Builds the check from a YAML dependency body (indented 4 spaces), the way healthgate does.
fn amqp_check(name: &str, body: &str) -> AmqpCheck {
    let yaml = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n\
         dependencies:\n  - name: {name}\n    type: rabbitmq\n    timeout: 2s\n{body}"
    );
    let config = Config::from_yaml(&yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let dep = &config.dependencies[0];
    match &dep.kind {
        DependencyKind::Amqp(s) => AmqpCheck::new(s.clone(), dep),
        other => panic!("not an amqp dependency: {other:?}"),
    }
}

/// A check of the private node as the test user.
fn node_check(name: &str, vhost: &str, extra: &str) -> AmqpCheck {
    let node = rabbitmq::node();
    let pw = password_file();
    amqp_check(name, &format!("    url: {}\n    password_file: {}\n{extra}", node.url(USER, vhost), pw.display()))
}

/// One check with the standard timeout, also asserting it kept to it.
async fn probe(check: &mut AmqpCheck) -> Result<(), CheckError> {
    let started = Instant::now();
    let r = check.check(started + TIMEOUT).await;
    assert!(started.elapsed() <= TIMEOUT + GRACE, "check took {:?} ({r:?})", started.elapsed());
    r
}

async fn eventually_ok(check: &mut AmqpCheck, what: &str, within: Duration) {
    let mut last;
    let deadline = Instant::now() + within;
    loop {
        match probe(check).await {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        assert!(Instant::now() < deadline, "{what}: still failing after {within:?}: {last:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn eventually_cause(check: &mut AmqpCheck, cause: Cause, within: Duration) -> CheckError {
    let mut last;
    let deadline = Instant::now() + within;
    loop {
        match probe(check).await {
            Err(e) if e.cause == cause => return e,
            other => last = Some(other),
        }
        assert!(Instant::now() < deadline, "no {cause} within {within:?}; last result {last:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks again and again for `span`, asserting that every result has
/// `cause`: a property that must hold over a stretch of time, not at one instant.
async fn holds_cause(check: &mut AmqpCheck, cause: Cause, span: Duration) {
    let until = Instant::now() + span;
    loop {
        let r = probe(check).await;
        assert_eq!(r.as_ref().err().map(|e| e.cause), Some(cause), "{r:?}");
        if Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Declares a durable queue with an independent client (lapin).
async fn declare_queue(name: &str) {
    let node = rabbitmq::node();
    let uri = format!("amqp://{USER}:{PASSWORD}@127.0.0.1:{}/%2f", node.port);
    let conn = tokio::time::timeout(STEP, lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()))
        .await
        .expect("lapin connect in time")
        .expect("lapin connect");
    let ch = tokio::time::timeout(STEP, conn.create_channel()).await.unwrap().unwrap();
    let opts = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    tokio::time::timeout(STEP, ch.queue_declare(name.into(), opts, Default::default())).await.unwrap().unwrap();
    let _ = tokio::time::timeout(STEP, conn.close(200, "bye".into())).await;
}

#[tokio::test]
async fn healthy_node_passes_and_reports_version_and_node() {
    let _g = rabbitmq::shared().await;
    let mut check = node_check("mq-healthy", "", "");
    probe(&mut check).await.expect("healthy");
    // The persistent connection is reused: a second round trip passes too.
    probe(&mut check).await.expect("healthy again");
    let d = check.details();
    let version = d.server_version.expect("server version");
    assert!(version.starts_with(char::is_numeric), "{version}");
    assert_eq!(d.nodes.len(), 1);
    assert_eq!(d.nodes[0].address, format!("127.0.0.1:{}", rabbitmq::node().port));
    assert!(d.nodes[0].up);
    check.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn wrong_password_is_auth() {
    let _g = rabbitmq::shared().await;
    let node = rabbitmq::node();
    let pw = node.dir().join("wrong-password");
    std::fs::write(&pw, "not-the-password").unwrap();
    let mut check =
        amqp_check("mq-auth", &format!("    url: {}\n    password_file: {}\n", node.url(USER, ""), pw.display()));
    let err = probe(&mut check).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(!err.message.contains("not-the-password"), "{err}");
}

#[tokio::test]
async fn unknown_vhost_is_vhost() {
    let _g = rabbitmq::shared().await;
    let mut check = node_check("mq-vhost", "no-such-vhost", "");
    let err = probe(&mut check).await.unwrap_err();
    assert_eq!(err.cause, Cause::Vhost, "{err}");
}

#[tokio::test]
async fn missing_queue_is_not_found_and_existing_queue_passes() {
    let _g = rabbitmq::shared().await;
    declare_queue("hg-present").await;
    let mut check = node_check("mq-queues", "", "    queues: [hg-present]\n");
    probe(&mut check).await.expect("existing queue");

    let mut check = node_check("mq-queues-missing", "", "    queues: [hg-missing, hg-present, hg-gone]\n");
    let err = probe(&mut check).await.unwrap_err();
    assert_eq!(err.cause, Cause::NotFound, "{err}");
    assert!(err.message.contains("hg-missing") && err.message.contains("hg-gone"), "{err}");
    assert!(!err.message.contains("hg-present"), "{err}");
    // The broker closed only the channel: the same connection keeps answering.
    assert_eq!(probe(&mut check).await.unwrap_err().cause, Cause::NotFound);
    declare_queue("hg-missing").await;
    declare_queue("hg-gone").await;
    probe(&mut check).await.expect("all queues exist now");
    check.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn queue_whose_home_node_is_down_is_not_ready_with_the_brokers_text() {
    let _g = rabbitmq::shared().await;
    let node = rabbitmq::node();
    declare_queue("hg-homeless").await;
    let mut check = node_check("mq-homeless", "", "    queues: [hg-homeless]\n");
    probe(&mut check).await.expect("the queue is available");
    // What the broker keeps of a durable queue whose home node went down: the
    // durable record without the live one. Here the live record is removed on
    // this single node (its home node stays this node), so the broker answers
    // exactly as it does in a cluster whose queue home node is down.
    let name = "rabbit_misc:r(<<\"/\">>, queue, <<\"hg-homeless\">>)";
    node.rabbitmqctl(&["eval", &format!("ok = mnesia:dirty_delete(rabbit_queue, {name}).")]);
    let err = probe(&mut check).await.unwrap_err();
    let restore =
        format!("[Q] = mnesia:dirty_read(rabbit_durable_queue, {name}), ok = mnesia:dirty_write(rabbit_queue, Q).");
    node.rabbitmqctl(&["eval", &restore]);
    assert_eq!(err.cause, Cause::NotReady, "{err}");
    assert!(err.message.contains("hg-homeless") && err.message.contains("is down or inaccessible"), "{err}");
    assert!(err.message.contains(&format!("home node '{}'", node.name)), "{err}");
    // Back: the same check passes again.
    eventually_ok(&mut check, "the queue is live again", STEP).await;
    check.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn frozen_node_fails_within_the_timeout_and_recovers_after_thaw() {
    let _g = rabbitmq::exclusive().await;
    let node = rabbitmq::node();
    let mut check = node_check("mq-freeze", "", "");
    probe(&mut check).await.expect("healthy before the freeze");
    let abrupt = |log: &str| log.matches("client unexpectedly closed TCP connection").count();
    let abrupt_before = abrupt(&node.log());
    let frozen = node.freeze();
    // `probe` asserts the failure comes within timeout + grace.
    let err = probe(&mut check).await.unwrap_err();
    assert_eq!(err.cause, Cause::ReadTimeout, "{err}");
    // A fresh connection to a frozen broker fails the same way, just as fast.
    let err = probe(&mut check).await.unwrap_err();
    assert_eq!(err.cause, Cause::ReadTimeout, "{err}");
    frozen.thaw();
    eventually_ok(&mut check, "recovery after SIGCONT", Duration::from_secs(15)).await;
    check.close(Instant::now() + TIMEOUT).await;
    // The connection abandoned at the freeze and the one that waited through
    // it both end with a clean close: nothing "unexpectedly closed".
    eventually("both connections closed cleanly", STEP, || async {
        (node.closed_cleanly("healthgate mq-freeze") == 2).then_some(())
    })
    .await;
    assert_eq!(abrupt(&node.log()), abrupt_before, "{}", node.connection_log("healthgate mq-freeze").join("\n"));
}

#[tokio::test]
async fn stopped_node_is_refused_and_the_same_check_recovers_after_start() {
    let _g = rabbitmq::exclusive().await;
    let node = rabbitmq::node();
    let mut check = node_check("mq-restart", "", "");
    probe(&mut check).await.expect("healthy before the stop");
    let stopped = node.stop_app();
    let err = eventually_cause(&mut check, Cause::Refused, Duration::from_secs(10)).await;
    assert!(err.message.contains("127.0.0.1"), "{err}");
    stopped.start();
    eventually_ok(&mut check, "recovery after start_app", Duration::from_secs(20)).await;
    check.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn cluster_with_a_dead_address_passes_with_any_and_fails_with_all() {
    let _g = rabbitmq::shared().await;
    let node = rabbitmq::node();
    let dead = free_port();
    let urls = format!("    urls: [\"{}\", \"amqp://{USER}@127.0.0.1:{dead}/\"]\n", node.url(USER, ""));
    let pw = format!("    password_file: {}\n", password_file().display());

    let mut any = amqp_check("mq-any", &format!("{urls}{pw}    require: any\n"));
    probe(&mut any).await.expect("one live node is enough with require: any");
    let d = any.details();
    assert_eq!(d.nodes.len(), 2, "{d:?}");
    assert!(d.nodes[0].up && d.nodes[0].cause.is_none(), "{d:?}");
    assert!(!d.nodes[1].up, "{d:?}");
    assert_eq!(d.nodes[1].cause, Some(Cause::Refused), "{d:?}");
    assert_eq!(d.nodes[1].address, format!("127.0.0.1:{dead}"));
    assert!(d.server_version.is_some());

    let mut all = amqp_check("mq-all", &format!("{urls}{pw}    require: all\n"));
    let err = probe(&mut all).await.unwrap_err();
    assert_eq!(err.cause, Cause::Refused, "{err}");
    assert!(err.message.contains("1 of 2 nodes up"), "{err}");
    assert_eq!(all.details().nodes.iter().filter(|n| n.up).count(), 1);
    any.close(Instant::now() + TIMEOUT).await;
    all.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn quorum_needs_more_than_half_of_the_nodes() {
    let _g = rabbitmq::shared().await;
    let node = rabbitmq::node();
    let (dead1, dead2) = (free_port(), free_port());
    // Two names for the one live node count as two nodes.
    let nodes = |third: u16| {
        format!("    nodes: [\"127.0.0.1:{}\", \"localhost:{}\", \"127.0.0.1:{third}\"]\n", node.port, node.port)
    };
    let body = |nodes: String| {
        format!(
            "    url: amqp://{USER}@127.0.0.1/\n    password_file: {}\n{nodes}    require: quorum\n",
            password_file().display()
        )
    };
    let mut two_of_three = amqp_check("mq-quorum-ok", &body(nodes(dead1)));
    probe(&mut two_of_three).await.expect("2 of 3 nodes up is a quorum");
    let one_of_three =
        format!("    nodes: [\"127.0.0.1:{}\", \"127.0.0.1:{dead1}\", \"127.0.0.1:{dead2}\"]\n", node.port);
    let mut lost = amqp_check("mq-quorum-lost", &body(one_of_three));
    let err = probe(&mut lost).await.unwrap_err();
    assert_eq!(err.cause, Cause::Refused, "{err}");
    assert!(err.message.starts_with("1 of 3 nodes up, 2 required (require: quorum)"), "{err}");
    two_of_three.close(Instant::now() + TIMEOUT).await;
    lost.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn memory_alarm_is_blocked_and_clears() {
    let _g = rabbitmq::exclusive().await;
    let node = rabbitmq::node();
    let mut check = node_check("mq-alarm", "", "");
    probe(&mut check).await.expect("healthy before the alarm");
    let alarm = node.set_vm_memory_high_watermark(0.0000001);
    let err = eventually_cause(&mut check, Cause::Blocked, Duration::from_secs(15)).await;
    assert!(err.message.contains("memory"), "{err}");
    // Still blocked on the next check, answered at once from the connection state.
    assert_eq!(probe(&mut check).await.unwrap_err().cause, Cause::Blocked);
    alarm.clear();
    eventually_ok(&mut check, "recovery after the alarm cleared", Duration::from_secs(15)).await;
    check.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn close_ends_the_connection_cleanly_in_the_broker_log() {
    let _g = rabbitmq::shared().await;
    let node = rabbitmq::node();
    let mut check = node_check("mq-close", "", "");
    probe(&mut check).await.expect("healthy");
    check.close(Instant::now() + TIMEOUT).await;
    eventually("the broker to log a clean close", STEP, || async {
        (node.closed_cleanly("healthgate mq-close") == 1).then_some(())
    })
    .await;
    assert!(!node.closed_abruptly("healthgate mq-close"), "{}", node.log());
}

#[tokio::test]
async fn a_cancelled_check_leaves_no_half_open_connection() {
    let _g = rabbitmq::shared().await;
    let node = rabbitmq::node();
    let mut check = node_check("mq-cancel", "", "");
    // The monitor may drop a check future at any point; do it mid-handshake.
    for delay_ms in [1u64, 3, 10] {
        let _ = tokio::time::timeout(Duration::from_millis(delay_ms), check.check(Instant::now() + TIMEOUT)).await;
    }
    probe(&mut check).await.expect("the next check starts clean");
    check.close(Instant::now() + TIMEOUT).await;
    // And a check dropped without close() still says goodbye.
    let mut dropped = node_check("mq-dropped", "", "");
    probe(&mut dropped).await.expect("healthy");
    drop(dropped);
    eventually("every connection closed cleanly", STEP, || async {
        (node.closed_cleanly("healthgate mq-cancel") >= 1 && node.closed_cleanly("healthgate mq-dropped") == 1)
            .then_some(())
    })
    .await;
    let log = node.log();
    assert!(!node.closed_abruptly("healthgate mq-cancel"), "{log}");
    assert!(!node.closed_abruptly("healthgate mq-dropped"), "{log}");
}

#[tokio::test]
async fn an_idle_connection_the_broker_dropped_is_reopened_not_reported() {
    let _g = rabbitmq::shared().await;
    let node = rabbitmq::node();
    // A 1 s heartbeat with 4 s between checks: the broker drops the idle
    // connection for missed heartbeats (a kept connection gone stale while idle).
    let mut check = node_check("mq-idle", "", "    heartbeat: 1s\n");
    probe(&mut check).await.expect("healthy");
    eventually("the broker to drop the idle connection", STEP, || async {
        let log = node.connection_log("healthgate mq-idle");
        log.iter().any(|l| l.contains("missed heartbeats from client, timeout: 1s")).then_some(())
    })
    .await;
    probe(&mut check).await.expect("a dropped idle connection is reopened within the same check");
    // The broker logs asynchronously.
    eventually("the broker to log the second connection", STEP, || async {
        (node.opened("healthgate mq-idle") == 2).then_some(())
    })
    .await;
    check.close(Instant::now() + TIMEOUT).await;
}

#[tokio::test]
async fn a_node_that_freezes_while_blocked_is_not_reported_blocked_forever() {
    let _g = rabbitmq::exclusive().await;
    let node = rabbitmq::node();
    // Blocked connections cannot carry a round trip; the broker's heartbeats
    // (1 s here) are what still show it alive.
    let mut check = node_check("mq-blocked-frozen", "", "    heartbeat: 1s\n");
    probe(&mut check).await.expect("healthy before the alarm");
    let alarm = node.set_vm_memory_high_watermark(0.0000001);
    eventually_cause(&mut check, Cause::Blocked, Duration::from_secs(15)).await;
    // A live broker keeps sending heartbeats to a connection it blocks: for
    // three heartbeat intervals, every check still says blocked, not silent.
    holds_cause(&mut check, Cause::Blocked, Duration::from_secs(3)).await;
    let frozen = node.freeze();
    let started = Instant::now();
    let err = eventually_cause(&mut check, Cause::ReadTimeout, Duration::from_secs(10)).await;
    // Two heartbeats of silence, plus the check that notices.
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}: {err}", started.elapsed());
    frozen.thaw();
    alarm.clear();
    eventually_ok(&mut check, "recovery after thaw and alarm clear", Duration::from_secs(15)).await;
    check.close(Instant::now() + TIMEOUT).await;
}
