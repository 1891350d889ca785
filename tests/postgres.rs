//! The `postgres` check against real, private PostgreSQL clusters (one per
//! test, `initdb` into a temp dir, ephemeral port; as the `postgres` system
//! user when the tests run as root).
//!
//! Run: `cargo test --test postgres` (needs the `postgresql` package; the
//! binaries are looked up in /usr/lib/postgresql/*/bin).

mod support;

use std::path::Path;
use std::time::Duration;

use healthgate::check::{AnyCheck, Cause, Check, CheckError};
use healthgate::config::{Config, DependencyConfig};
use support::pki::Pki;
use support::postgres::{
    CLEAR_USER, MD5_USER, PASSWORD, Postgres, REJECTED_USER, TLS_USER, TRUST_USER, USER, release_session,
};
use support::{STEP, eventually};
use tokio::time::Instant;

/// Builds a dependency from YAML lines (indented by four spaces) through the
/// real config loader.
fn dependency(lines: &str) -> DependencyConfig {
    let yaml = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\ndependencies:\n  - name: db\n    type: postgres\n{lines}"
    );
    let mut c = Config::from_yaml(&yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    c.dependencies.remove(0)
}

/// A check of `pg` as `user` with `password`, with `extra` YAML lines
/// (database `postgres` unless they name one).
fn check_as(pg: &Postgres, user: &str, password: &str, extra: &str) -> AnyCheck {
    let extra =
        if extra.contains("database:") { extra.to_string() } else { format!("{extra}    database: postgres\n") };
    let file = pg.dir().join(format!("password-{user}-{}", password.len()));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let dep = dependency(&format!(
        "    address: {}\n    user: {user}\n    password_file: {}\n{extra}",
        pg.address(),
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

const T: Duration = Duration::from_secs(2);

/// Checks every 50 ms until the check gives `want` (`None`: success), failing
/// the test after [`STEP`]; returns the last error.
async fn until(c: &mut AnyCheck, want: Option<Cause>, what: &str) -> Option<CheckError> {
    let end = Instant::now() + STEP;
    loop {
        let r = probe(c, T).await;
        match (&r, want) {
            (Ok(()), None) => return None,
            (Err(e), Some(cause)) if e.cause == cause => return r.err(),
            _ => {}
        }
        assert!(Instant::now() < end, "timed out waiting for: {what} (last: {r:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn close(c: &mut AnyCheck) {
    c.close(Instant::now() + T).await;
}

async fn no_sessions_left(pg: &Postgres, application_name: &str) {
    eventually("all check sessions closed", STEP, || async { (pg.sessions(application_name) == 0).then_some(()) })
        .await;
}

/// Lines of the server log that would mean a client vanished without
/// `Terminate`. The test's own `psql` runs are left out: a fast shutdown can
/// catch a psql backend before it read the `Terminate` already sent.
fn vanished_client_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| !l.contains("] psql: "))
        .filter(|l| {
            l.contains("unexpected EOF")
                || l.contains("could not receive data from client")
                || l.contains("could not send data to client")
                || l.contains("incomplete startup packet")
                || l.contains("connection reset")
        })
        .collect()
}

#[tokio::test]
async fn scram_md5_cleartext_and_trust_users_pass_on_one_persistent_connection() {
    let pg = Postgres::start().await;
    for (user, name) in [(USER, "hg-scram"), (MD5_USER, "hg-md5"), (CLEAR_USER, "hg-clear"), (TRUST_USER, "hg-trust")] {
        let mut c = check_as(&pg, user, PASSWORD, &format!("    application_name: {name}\n"));
        for _ in 0..10 {
            probe(&mut c, T).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        }
        assert_eq!(pg.sessions(name), 1, "{user}: one connection for all checks");
        let version = c.details().server_version.expect("server_version");
        assert!(version.chars().next().is_some_and(|c| c.is_ascii_digit()), "{version}");
        close(&mut c).await;
        no_sessions_left(&pg, name).await;
    }
    // The md5 user really has an md5 hash (so md5, not SCRAM, was spoken).
    assert!(pg.sql(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{MD5_USER}'")).starts_with("md5"));
    assert!(vanished_client_lines(&pg.log()).is_empty(), "{}", pg.log());
}

#[tokio::test]
async fn wrong_password_and_pg_hba_rejection_are_auth_with_distinct_messages() {
    let pg = Postgres::start().await;
    let wrong = "Wr0ng-Pa55word";
    let err = probe(&mut check_as(&pg, USER, wrong, ""), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(err.message.contains("28P01") && err.message.contains("password authentication failed"), "{err}");
    assert!(!err.message.contains(wrong) && !err.message.contains(PASSWORD), "{err}");
    let err = probe(&mut check_as(&pg, MD5_USER, wrong, ""), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");

    let err = probe(&mut check_as(&pg, REJECTED_USER, PASSWORD, ""), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(err.message.contains("28000") && err.message.contains("pg_hba.conf"), "{err}");
    assert!(!err.message.contains(PASSWORD), "{err}");

    // No password configured for a SCRAM user: auth, said plainly.
    let dep = dependency(&format!("    address: {}\n    user: {USER}\n", pg.address()));
    let err = probe(&mut AnyCheck::new(&dep), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(err.message.contains("none is configured"), "{err}");
}

#[tokio::test]
async fn unknown_database_is_not_found_and_a_failing_query_is_server_error_on_a_kept_connection() {
    let pg = Postgres::start().await;
    let err = probe(&mut check_as(&pg, USER, PASSWORD, "    database: nope\n"), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::NotFound, "{err}");
    assert!(err.message.contains("3D000"), "{err}");

    let mut c = check_as(
        &pg,
        USER,
        PASSWORD,
        "    database: app\n    query: SELECT 1 FROM missing_table\n    application_name: hg-q\n",
    );
    for _ in 0..3 {
        let err = probe(&mut c, T).await.unwrap_err();
        assert_eq!(err.cause, Cause::ServerError, "{err}");
        assert!(err.message.contains("42P01"), "{err}");
    }
    assert_eq!(pg.sessions("hg-q"), 1, "the connection is kept after an ERROR");
    close(&mut c).await;
    no_sessions_left(&pg, "hg-q").await;
}

#[tokio::test]
async fn a_full_server_is_too_many_connections_then_healthy_once_a_slot_frees() {
    let pg = Postgres::start_with(&["max_connections=3", "superuser_reserved_connections=0"]).await;
    let mut held = Vec::new();
    while let Some(s) = pg.hold_session().await {
        held.push(s);
        assert!(held.len() <= 3, "max_connections=3 lets in {} sessions", held.len());
    }
    let mut c = check_as(&pg, USER, PASSWORD, "");
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::TooManyConnections, "{err}");
    assert!(err.message.contains("53300"), "{err}");
    release_session(held.pop().expect("a held session")).await;
    until(&mut c, None, "check healthy once a slot is free").await;
    close(&mut c).await;
    for s in held {
        release_session(s).await;
    }
}

#[tokio::test]
async fn require_writable_passes_on_the_primary_and_is_not_master_on_a_standby_or_read_only_server() {
    let pg = Postgres::start().await;
    let mut primary = check_as(&pg, USER, PASSWORD, "    require_writable: true\n");
    probe(&mut primary, T).await.unwrap();

    let standby = pg.standby().await;
    let mut c = check_as(&standby, USER, PASSWORD, "    require_writable: true\n");
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::NotMaster, "{err}");
    assert!(err.message.contains("standby"), "{err}");
    // Without require_writable the standby is healthy.
    probe(&mut check_as(&standby, USER, PASSWORD, ""), T).await.unwrap();

    // default_transaction_read_only turned on by a reload: seen on the kept connection.
    pg.sql("ALTER SYSTEM SET default_transaction_read_only = on");
    pg.sql("SELECT pg_reload_conf()");
    let err = until(&mut primary, Some(Cause::NotMaster), "read-only primary is not_master").await.unwrap();
    assert!(err.message.contains("transaction_read_only"), "{err}");
    pg.sql("ALTER SYSTEM RESET default_transaction_read_only");
    pg.sql("SELECT pg_reload_conf()");
    until(&mut primary, None, "primary writable again").await;
    close(&mut primary).await;
    close(&mut c).await;
}

#[tokio::test]
async fn idle_session_timeout_shorter_than_the_interval_causes_no_false_outage() {
    let pg = Postgres::start().await;
    pg.sql(&format!("ALTER ROLE {USER} SET idle_session_timeout = '150ms'"));
    let mut c = check_as(&pg, USER, PASSWORD, "    application_name: hg-idle\n");
    for i in 0..12 {
        probe(&mut c, T).await.unwrap_or_else(|e| panic!("check {i}: {e}"));
        // The interval between checks, longer than the server's idle timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = pg.log();
    assert!(log.matches("idle-session timeout").count() >= 10, "the server did close idle sessions:\n{log}");
    close(&mut c).await;
    assert!(vanished_client_lines(&log).is_empty(), "{log}");
}

#[tokio::test]
async fn stopped_server_is_refused_and_the_same_check_recovers_after_start() {
    let mut pg = Postgres::start().await;
    let mut c = check_as(&pg, USER, PASSWORD, "");
    probe(&mut c, T).await.unwrap();
    pg.stop();
    // The kept connection got FATAL 57P01 at shutdown; the one reconnect is refused.
    let err = probe(&mut c, T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Refused, "{err}");
    pg.start_again().await;
    probe(&mut c, T).await.unwrap();
    close(&mut c).await;
}

#[tokio::test]
async fn frozen_server_times_out_within_the_deadline_and_recovers_on_thaw() {
    let pg = Postgres::start().await;
    let mut warm = check_as(&pg, USER, PASSWORD, "    application_name: hg-warm\n");
    probe(&mut warm, T).await.unwrap();
    let short = Duration::from_millis(400);

    pg.freeze();
    let err = probe(&mut warm, short).await.unwrap_err();
    assert_eq!(err.cause, Cause::ReadTimeout, "{err}");
    assert_eq!(probe(&mut warm, short).await.unwrap_err().cause, Cause::ReadTimeout);
    // A check without a connection: TCP accepted by the kernel, no startup reply.
    let mut cold = check_as(&pg, USER, PASSWORD, "    application_name: hg-cold\n");
    let err = probe(&mut cold, short).await.unwrap_err();
    assert_eq!(err.cause, Cause::ConnectTimeout, "{err}");
    assert_eq!(probe(&mut cold, short).await.unwrap_err().cause, Cause::ConnectTimeout);
    pg.thaw();

    until(&mut warm, None, "warm check recovers").await;
    until(&mut cold, None, "cold check recovers").await;
    // Still one connection each: nothing was opened twice while the server was frozen.
    assert_eq!(pg.sessions("hg-warm"), 1);
    assert_eq!(pg.sessions("hg-cold"), 1);
    close(&mut warm).await;
    close(&mut cold).await;
    no_sessions_left(&pg, "hg-warm").await;
    assert!(vanished_client_lines(&pg.log()).is_empty(), "{}", pg.log());
}

#[tokio::test]
async fn hundreds_of_checks_and_a_clean_shutdown_leave_no_vanished_client_in_the_server_log() {
    // At debug1 the server logs even a client that closes an idle session
    // without `Terminate` (at the default level only one inside a transaction).
    let mut pg =
        Postgres::start_with(&["log_min_messages=debug1", "log_connections=on", "log_disconnections=on"]).await;
    pg.sql(&format!("ALTER ROLE {MD5_USER} SET idle_session_timeout = '100ms'"));
    let mut ok = check_as(&pg, USER, PASSWORD, "    query: SELECT 1\n");
    let mut writable = check_as(&pg, TRUST_USER, "", "    require_writable: true\n");
    let mut failing = check_as(&pg, USER, PASSWORD, "    query: SELECT 1/0\n");
    let mut idle = check_as(&pg, MD5_USER, PASSWORD, "");
    let mut wrong = check_as(&pg, USER, "nope", "");
    for i in 0..300 {
        probe(&mut ok, T).await.unwrap();
        probe(&mut writable, T).await.unwrap();
        assert_eq!(probe(&mut failing, T).await.unwrap_err().cause, Cause::ServerError);
        if i % 20 == 0 {
            assert_eq!(probe(&mut wrong, T).await.unwrap_err().cause, Cause::Auth);
            tokio::time::sleep(Duration::from_millis(150)).await;
            probe(&mut idle, T).await.unwrap();
        }
        if i % 50 == 0 {
            // A check cancelled mid-exchange (the monitor does this to an overrun check).
            let _ = tokio::time::timeout(Duration::from_micros(50), ok.check(Instant::now() + T)).await;
        }
    }
    for c in [&mut ok, &mut writable, &mut failing, &mut idle, &mut wrong] {
        close(c).await;
    }
    no_sessions_left(&pg, "healthgate").await;
    pg.stop();
    let log = pg.log();
    assert!(vanished_client_lines(&log).is_empty(), "{log}");
    assert!(log.contains("password authentication failed"), "the log is the server's:\n{log}");

    // Control: a client that just closes its session is logged, so the
    // assertion above can fail.
    pg.start_again().await;
    drop(pg.hold_session().await.expect("a session"));
    eventually("the server logs a client that vanished", STEP, || async {
        (!vanished_client_lines(&pg.log()).is_empty()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn missing_password_file_is_config_and_unresolvable_host_is_dns() {
    let dep =
        dependency(&format!("    address: 127.0.0.1:1\n    user: {USER}\n    password_file: /nonexistent/hg-pw\n"));
    let err = probe(&mut AnyCheck::new(&dep), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Config, "{err}");
    let dep = dependency(&format!("    address: postgres://{USER}@no-such-host.invalid/app\n"));
    let err = probe(&mut AnyCheck::new(&dep), Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(err.cause, Cause::Dns, "{err}");
}

#[tokio::test]
async fn tls_true_negotiates_with_sslrequest_and_verifies_the_certificate() {
    let pki = Pki::generate();
    let mut pg = Postgres::start().await;
    // Before the server has TLS, a TLS check is refused plainly.
    let tls = format!("    tls: true\n    tls_ca_file: {}\n    tls_server_name: localhost\n", pki.path("ca.pem"));
    let err = probe(&mut check_as(&pg, TLS_USER, PASSWORD, &tls), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
    pg.enable_tls(&pki.file("server.pem"), &pki.file("server.key")).await;

    // pg_hba.conf admits this user over TLS only: proof that the check below used TLS.
    let err = probe(&mut check_as(&pg, TLS_USER, PASSWORD, ""), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(err.message.contains("no encryption"), "{err}");
    let mut c = check_as(&pg, TLS_USER, PASSWORD, &format!("{tls}    application_name: hg-tls\n"));
    for _ in 0..5 {
        probe(&mut c, T).await.unwrap();
    }
    assert_eq!(pg.sql("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND application_name = 'hg-tls'"), "1");
    close(&mut c).await;
    // Without the private CA the certificate is not trusted.
    let err = probe(&mut check_as(&pg, TLS_USER, PASSWORD, "    tls: true\n"), T).await.unwrap_err();
    assert_eq!(err.cause, Cause::Tls, "{err}");
}
