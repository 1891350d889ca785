//! The `mysql` check against a real, private MariaDB server (one per test,
//! started from a fresh data directory on an ephemeral port).
//!
//! Run: `cargo test --test mysql` (needs mariadb-server installed; the
//! binaries are looked up in PATH and /usr/sbin).

mod support;

use std::path::Path;
use std::time::Duration;

use healthgate::check::{AnyCheck, Cause, Check, CheckError};
use healthgate::config::{Config, DependencyConfig};
use support::mariadb::{MariaDb, PASSWORD, USER};
use support::{STEP, eventually};
use tokio::time::Instant;

/// Builds a dependency from YAML lines (indented by four spaces) through the
/// real config loader.
fn dependency(lines: &str) -> DependencyConfig {
    let yaml = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\ndependencies:\n  - name: db\n    type: mysql\n{lines}"
    );
    let mut c = Config::from_yaml(&yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    c.dependencies.remove(0)
}

/// A check of `db` as the test user, with `extra` YAML lines.
fn check_of(db: &MariaDb, password: &str, extra: &str) -> AnyCheck {
    let file = db.dir().join(format!("password-{}", password.len()));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let dep = dependency(&format!(
        "    address: {}\n    user: {USER}\n    password_file: {}\n{extra}",
        db.address(),
        file.display()
    ));
    AnyCheck::new(&dep)
}

/// Runs one check with the given timeout, failing the test if the check
/// itself does not return by its deadline (plus a little scheduling slack).
async fn probe(c: &mut AnyCheck, timeout: Duration) -> Result<(), CheckError> {
    let start = Instant::now();
    let r = tokio::time::timeout(STEP, c.check(start + timeout)).await.expect("check hung past its deadline");
    let took = start.elapsed();
    assert!(took < timeout + Duration::from_millis(250), "check took {took:?} with a {timeout:?} deadline");
    r
}

const T: Duration = Duration::from_secs(1);

async fn close(c: &mut AnyCheck) {
    c.close(Instant::now() + T).await;
}

async fn no_connections_left(db: &MariaDb) {
    eventually("all check connections closed", STEP, || async { (db.connections().await == 0).then_some(()) }).await;
}

#[tokio::test]
async fn healthy_server_passes_on_one_persistent_connection_and_reports_its_version() {
    let db = MariaDb::start().await;
    let mut c = check_of(&db, PASSWORD, "");
    for _ in 0..20 {
        probe(&mut c, T).await.unwrap();
    }
    let version = c.details().server_version.expect("server_version");
    assert!(version.contains("MariaDB"), "{version}");
    assert_eq!(db.connections().await, 1, "one connection for all checks");
    close(&mut c).await;
    no_connections_left(&db).await;
    assert_eq!(db.aborted().await, (0, 0));
}

#[tokio::test]
async fn wrong_password_is_auth_and_the_message_has_no_password() {
    let db = MariaDb::start().await;
    let wrong = "Wr0ng-Pa55word";
    let mut c = check_of(&db, wrong, "");
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(err.message.contains("1045"), "{err}");
    assert!(!err.message.contains(wrong) && !err.message.contains(PASSWORD), "{err}");
}

#[tokio::test]
async fn missing_password_file_is_a_config_failure() {
    let dep =
        dependency(&format!("    address: 127.0.0.1:1\n    user: {USER}\n    password_file: /nonexistent/hg-pw\n"));
    let mut c = AnyCheck::new(&dep);
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Config, "{err}");
    assert!(err.message.contains("/nonexistent/hg-pw"), "{err}");
}

#[tokio::test]
async fn unresolvable_host_is_dns() {
    let dep = dependency(&format!("    address: no-such-host.invalid\n    user: {USER}\n"));
    let err = probe(&mut AnyCheck::new(&dep), Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(err.cause, Cause::Dns, "{err}");
}

#[tokio::test]
async fn killed_server_is_refused_and_the_same_check_recovers_after_restart() {
    let mut db = MariaDb::start().await;
    let mut c = check_of(&db, PASSWORD, "");
    probe(&mut c, T).await.unwrap();
    db.kill();
    // The persistent connection dies with the server; the check reconnects
    // once, which is refused: a real outage is reported as one.
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Refused, "{err}");
    assert_eq!(probe(&mut c, T).await.unwrap_err().cause, Cause::Refused);
    db.start_again().await;
    probe(&mut c, T).await.unwrap();
    close(&mut c).await;
    no_connections_left(&db).await;
    assert_eq!(db.aborted().await, (0, 0), "counted since the restart");
}

#[tokio::test]
async fn frozen_server_times_out_within_the_deadline_and_recovers_on_thaw() {
    let db = MariaDb::start().await;
    let before = db.aborted().await;
    let mut warm = check_of(&db, PASSWORD, "");
    probe(&mut warm, T).await.unwrap();
    let short = Duration::from_millis(400);

    db.freeze();
    // On the open connection the ping goes unanswered.
    let err = probe(&mut warm, short).await.unwrap_err();
    assert_eq!(err.cause, Cause::ReadTimeout, "{err}");
    assert_eq!(probe(&mut warm, short).await.unwrap_err().cause, Cause::ReadTimeout);
    // A check without a connection gets TCP accepted by the kernel but no greeting.
    let mut cold = check_of(&db, PASSWORD, "");
    let err = probe(&mut cold, short).await.unwrap_err();
    assert_eq!(err.cause, Cause::ConnectTimeout, "{err}");
    db.thaw();

    probe(&mut warm, T).await.unwrap();
    probe(&mut cold, T).await.unwrap();
    close(&mut warm).await;
    close(&mut cold).await;
    no_connections_left(&db).await;
    // The late exchanges were completed, not cut off: nothing was aborted.
    assert_eq!(db.aborted().await, before);
}

#[tokio::test]
async fn cancelled_check_leaves_a_clean_state_and_no_aborted_connection() {
    let db = MariaDb::start().await;
    let before = db.aborted().await;
    let mut warm = check_of(&db, PASSWORD, "");
    let mut cold = check_of(&db, PASSWORD, "");
    probe(&mut warm, T).await.unwrap();
    db.freeze();
    // The monitor drops a check future that overruns: simulate it.
    for c in [&mut warm, &mut cold] {
        let cancelled = tokio::time::timeout(Duration::from_millis(200), c.check(Instant::now() + STEP)).await;
        assert!(cancelled.is_err(), "the check should still be waiting");
    }
    db.thaw();
    probe(&mut warm, T).await.unwrap();
    probe(&mut cold, T).await.unwrap();
    close(&mut warm).await;
    close(&mut cold).await;
    no_connections_left(&db).await;
    assert_eq!(db.aborted().await, before);
}

#[tokio::test]
async fn short_wait_timeout_closes_the_connection_after_each_check_with_no_failures() {
    let db = MariaDb::start().await;
    db.set_global("wait_timeout", "1").await;
    let before = db.aborted().await;
    // interval 2s is not comfortably below wait_timeout 1s.
    let mut c = check_of(&db, PASSWORD, "    interval: 2s\n");
    // A failing query leaves a working connection: it is recycled too.
    let mut failing = check_of(&db, PASSWORD, "    interval: 2s\n    query: SELECT * FROM app.missing_table\n");
    for i in 0..6 {
        probe(&mut c, T).await.unwrap_or_else(|e| panic!("check {i}: {e}"));
        assert_eq!(probe(&mut failing, T).await.unwrap_err().cause, Cause::ServerError);
        no_connections_left(&db).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    probe(&mut c, T).await.unwrap();
    close(&mut c).await;
    close(&mut failing).await;
    no_connections_left(&db).await;
    assert_eq!(db.aborted().await, before, "closed with COM_QUIT, never left for the server to kill");
}

#[tokio::test]
async fn connection_idle_past_wait_timeout_is_replaced_within_the_same_check() {
    let db = MariaDb::start().await;
    db.set_global("wait_timeout", "1").await;
    // A short configured interval keeps the connection open, but the checks
    // come late (a paused monitor): the server kills it while idle.
    let mut c = check_of(&db, PASSWORD, "    interval: 100ms\n");
    probe(&mut c, T).await.unwrap();
    let clients_before = db.status("Aborted_clients").await;
    for i in 0..6 {
        // Wait until the server has really dropped the idle connection.
        eventually("server kills the idle connection", STEP, || async { (db.connections().await == 0).then_some(()) })
            .await;
        probe(&mut c, T).await.unwrap_or_else(|e| panic!("check {i} after an idle kill: {e}"));
    }
    close(&mut c).await;
    // The server counted its own idle kills, which proves the reconnect path ran.
    assert!(db.status("Aborted_clients").await > clients_before);
}

#[tokio::test]
async fn connection_killed_by_the_server_is_replaced_within_the_same_check() {
    let db = MariaDb::start().await;
    let mut c = check_of(&db, PASSWORD, "");
    probe(&mut c, T).await.unwrap();
    for i in 0..5 {
        // Only the check's connection is left (a killed one may linger a moment).
        eventually("one check connection", STEP, || async { (db.connections().await == 1).then_some(()) }).await;
        // The connection dies while idle, well before its wait_timeout: the
        // next check finds it closed on first use and reconnects once.
        assert_eq!(db.kill_connections_of(USER).await, 1);
        probe(&mut c, T).await.unwrap_or_else(|e| panic!("check {i} after a server-side kill: {e}"));
    }
    close(&mut c).await;
}

#[tokio::test]
async fn require_writable_follows_read_only() {
    let db = MariaDb::start().await;
    let mut c = check_of(&db, PASSWORD, "    require_writable: true\n");
    probe(&mut c, T).await.unwrap();
    db.set_global("read_only", "ON").await;
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::NotReady, "{err}");
    assert!(err.message.contains("read_only"), "{err}");
    db.set_global("read_only", "OFF").await;
    probe(&mut c, T).await.unwrap();
    close(&mut c).await;
}

#[tokio::test]
async fn galera_mode_on_a_server_without_wsrep_is_not_ready() {
    let db = MariaDb::start().await;
    let mut c = check_of(&db, PASSWORD, "    galera: true\n");
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::NotReady, "{err}");
    assert!(err.message.contains("wsrep"), "{err}");
    close(&mut c).await;
}

#[tokio::test]
async fn failing_query_is_server_error_and_keeps_the_connection() {
    let db = MariaDb::start().await;
    let mut c = check_of(&db, PASSWORD, "    database: app\n    query: SELECT * FROM missing_table\n");
    for _ in 0..3 {
        let err = probe(&mut c, T).await.unwrap_err();
        assert_eq!(err.cause, Cause::ServerError, "{err}");
        assert!(err.message.contains("1146"), "{err}");
    }
    assert_eq!(db.connections().await, 1);
    close(&mut c).await;
}

/// The goal: over hundreds of checks, successes and failures mixed,
/// healthgate itself never makes the server count an aborted connection.
#[tokio::test]
async fn aborted_counters_do_not_move_over_hundreds_of_checks_with_failures() {
    let db = MariaDb::start().await;
    let before = db.aborted().await;
    let mut ping = check_of(&db, PASSWORD, "");
    let mut writable = check_of(&db, PASSWORD, "    require_writable: true\n");
    let mut query = check_of(&db, PASSWORD, "    query: SELECT * FROM app.missing_table\n");
    let mut recycled = check_of(&db, PASSWORD, "    interval: 5h\n");
    let (mut ok, mut failed) = (0, 0);
    let mut tally = |r: Result<(), CheckError>| match r {
        Ok(()) => ok += 1,
        Err(_) => failed += 1,
    };
    for _ in 0..100 {
        tally(probe(&mut ping, T).await);
        tally(probe(&mut query, T).await);
    }
    for _ in 0..20 {
        tally(probe(&mut recycled, T).await);
    }
    db.set_global("read_only", "ON").await;
    for _ in 0..50 {
        tally(probe(&mut writable, T).await);
    }
    db.set_global("read_only", "OFF").await;
    for _ in 0..50 {
        tally(probe(&mut writable, T).await);
    }
    db.freeze();
    for c in [&mut ping, &mut writable, &mut query, &mut recycled] {
        tally(probe(c, Duration::from_millis(300)).await);
    }
    db.thaw();
    for c in [&mut ping, &mut writable, &mut recycled] {
        probe(c, T).await.unwrap();
    }
    for c in [&mut ping, &mut writable, &mut query, &mut recycled] {
        close(c).await;
    }
    no_connections_left(&db).await;
    let after = db.aborted().await;
    println!("{ok} checks passed, {failed} failed; Aborted_connects/clients {before:?} -> {after:?}");
    assert!(ok >= 170 && failed >= 150, "ok {ok}, failed {failed}");
    assert_eq!(after, before, "(Aborted_connects, Aborted_clients)");

    // A rejected password is the one failure the server counts, once per
    // attempt (MariaDB adds each access-denied login to Aborted_connects).
    let mut bad = check_of(&db, "Wr0ng-Pa55word", "");
    for _ in 0..5 {
        assert_eq!(probe(&mut bad, T).await.unwrap_err().cause, Cause::Auth);
    }
    let after_bad = db.aborted().await;
    assert_eq!(after_bad, (before.0 + 5, before.1), "exactly one aborted connect per rejected login");
}

#[tokio::test]
async fn server_at_max_connections_is_too_many_connections_and_recovers() {
    // 10 is the smallest max_connections MariaDB accepts.
    let db = MariaDb::start_with(&["--max-connections=10".into()]).await;
    // Root sessions take every ordinary slot (root could still use the one
    // extra slot MariaDB keeps for CONNECTION ADMIN; the check user cannot).
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(db.admin().await);
    }
    let mut c = check_of(&db, PASSWORD, "");
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::TooManyConnections, "{err}");
    // One slot freed: the check logs in and takes it, so the server is full
    // again for everyone else, which the open connection now reports.
    sessions.pop().unwrap().disconnect().await.unwrap();
    let start = Instant::now();
    let err = loop {
        match probe(&mut c, T).await {
            Err(e) if e.message.contains("max_connections") => break e,
            other => assert!(start.elapsed() < STEP, "the check never logged in to the last slot: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(err.cause, Cause::TooManyConnections, "{err}");
    sessions.pop().unwrap().disconnect().await.unwrap();
    let mut recovered = false;
    for _ in 0..40 {
        if probe(&mut c, T).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the check passes once a slot is free");
    close(&mut c).await;
    for s in sessions {
        s.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn saturation_by_other_clients_is_too_many_connections_on_the_open_connection_and_recovers() {
    // 10 is the smallest max_connections MariaDB accepts.
    let db = MariaDb::start_with(&["--max-connections=10".into()]).await;
    let mut c = check_of(&db, PASSWORD, "");
    probe(&mut c, T).await.unwrap();
    // Other clients log in as an application would (over TCP, without
    // CONNECTION ADMIN) one by one while the check keeps its connection: the
    // check must fail exactly when the next login gets 1040.
    let port = db.port();
    let login = || async move {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(port)
            .user(Some(USER))
            .pass(Some(PASSWORD))
            .prefer_socket(false);
        tokio::time::timeout(STEP, mysql_async::Conn::new(opts)).await.expect("login timed out")
    };
    let mut others = Vec::new();
    let err = loop {
        assert!(others.len() < 10, "{} other clients logged in, beyond max_connections", others.len());
        let verdict = probe(&mut c, T).await;
        match login().await {
            Ok(conn) => {
                verdict.unwrap_or_else(|e| {
                    panic!("failed with {} other clients while logins still work: {e}", others.len())
                });
                others.push(conn);
            }
            Err(mysql_async::Error::Server(e)) if e.code == 1040 => {
                break verdict.expect_err("a new login gets 1040 but the check passed");
            }
            Err(e) => panic!("unexpected login failure: {e}"),
        }
    };
    assert_eq!(err.cause, Cause::TooManyConnections, "{err}");
    assert!(err.message.contains("max_connections 10"), "{err}");
    // One client leaves: healthy again, on the same connection.
    others.pop().unwrap().disconnect().await.unwrap();
    let start = Instant::now();
    while let Err(e) = probe(&mut c, T).await {
        assert!(start.elapsed() < STEP, "still failing after a slot was freed: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Off: the open connection passes however full the server is.
    let mut ignoring = check_of(&db, PASSWORD, "    fail_on_saturation: false\n");
    probe(&mut ignoring, T).await.unwrap();
    let last = login().await.expect_err("the server is full again");
    assert!(matches!(&last, mysql_async::Error::Server(e) if e.code == 1040), "{last}");
    probe(&mut ignoring, T).await.unwrap();
    close(&mut ignoring).await;
    close(&mut c).await;
    for s in others {
        s.disconnect().await.unwrap();
    }
}
