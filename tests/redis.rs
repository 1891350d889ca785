//! The `redis` check against real, private `redis-server` processes
//! (plain, password, ACL user, replica, sentinel) on ephemeral ports.
//!
//! Run with `cargo test --test redis`; needs `redis-server` installed.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use healthgate::check::{AnyCheck, Cause, Check, CheckError};
use healthgate::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use support::redis::Redis;
use support::{STEP, eventually};

/// Per-check timeout used by these tests.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Builds the check of a one-dependency config whose `redis` entry is `dep`.
fn check_for(dep: &str) -> AnyCheck {
    let body: String = dep.lines().map(|l| format!("    {l}\n")).collect();
    let yaml = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n\
         dependencies:\n  - name: cache\n    type: redis\n{body}"
    );
    let config = Config::from_yaml(&yaml, Path::new("redis-test.yaml")).expect("valid config");
    AnyCheck::new(&config.dependencies[0])
}

/// Runs one check with the test timeout as its deadline.
async fn probe(c: &mut AnyCheck) -> Result<(), CheckError> {
    tokio::time::timeout(STEP, c.check(Instant::now() + TIMEOUT)).await.expect("check overran its deadline")
}

/// Checks every 50 ms until one passes; returns how long that took.
async fn until_healthy(c: &mut AnyCheck, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match probe(c).await {
            Ok(()) => return start.elapsed(),
            Err(e) if start.elapsed() > within => panic!("still failing after {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A password file in a temp dir.
fn password_file(pw: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redis-password");
    std::fs::write(&path, format!("{pw}\n")).unwrap();
    let p = path.to_str().unwrap().to_string();
    (dir, p)
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()))
}

#[tokio::test]
async fn healthy_server_passes_and_reports_its_version() {
    let redis = Redis::start(&[]);
    let mut c = check_for(&format!("address: {}", redis.address()));
    probe(&mut c).await.unwrap();
    let version = info_field(&redis.info("server"), "redis_version").unwrap();
    assert_eq!(c.details().server_version, Some(version));
    assert_eq!(c.details().current_master, None);
}

#[tokio::test]
async fn password_required_but_not_configured_is_auth() {
    let redis = Redis::start(&["--requirepass", "s3cret"]);
    let mut c = check_for(&format!("address: {}", redis.address()));
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(err.message.contains("NOAUTH"), "{err}");
}

#[tokio::test]
async fn wrong_password_is_auth_and_never_shown() {
    let redis = Redis::start(&["--requirepass", "s3cret"]);
    let (_dir, file) = password_file("not-the-password");
    let mut c = check_for(&format!("address: {}\npassword_file: {file}", redis.address()));
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(!err.message.contains("not-the-password"), "{err}");
}

#[tokio::test]
async fn right_password_from_file_passes() {
    let redis = Redis::start(&["--requirepass", "s3cret"]);
    let (_dir, file) = password_file("s3cret");
    let mut c = check_for(&format!("address: {}\npassword_file: {file}", redis.address()));
    probe(&mut c).await.unwrap();
}

#[tokio::test]
async fn acl_user_authenticates_with_username_and_password() {
    let redis = Redis::start(&["--user", "probe", "on", ">probe-pw", "+ping", "+role", "+info"]);
    let (_dir, good) = password_file("probe-pw");
    let mut c = check_for(&format!("address: {}\nusername: probe\npassword_file: {good}", redis.address()));
    probe(&mut c).await.unwrap();
    let (_dir2, bad) = password_file("nope");
    let mut c = check_for(&format!("address: {}\nusername: probe\npassword_file: {bad}", redis.address()));
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    assert!(err.message.contains("WRONGPASS"), "{err}");
}

#[tokio::test]
async fn password_configured_but_not_required_by_the_server_is_auth() {
    let redis = Redis::start(&[]);
    let (_dir, file) = password_file("s3cret");
    let mut c = check_for(&format!("address: {}\npassword_file: {file}", redis.address()));
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
}

#[tokio::test]
async fn maxclients_reached_is_too_many_connections() {
    let redis = Redis::start(&["--maxclients", "1"]);
    let mut first = check_for(&format!("address: {}", redis.address()));
    // The harness's readiness connection may still hold the only slot for a moment.
    until_healthy(&mut first, STEP).await;
    let mut second = check_for(&format!("address: {}", redis.address()));
    let err = probe(&mut second).await.unwrap_err();
    assert_eq!(err.cause, Cause::TooManyConnections, "{err}");
}

#[tokio::test]
async fn loading_dataset_is_loading_until_it_is_loaded() {
    // key-load-delay (µs per key) makes a 1000-key dataset load for ~2 s;
    // a small events interval lets the server answer -LOADING meanwhile.
    let mut redis = Redis::start(&[
        "--enable-debug-command",
        "local",
        "--key-load-delay",
        "2000",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    assert!(redis.command(&["DEBUG", "POPULATE", "1000"]).starts_with("+OK"));
    assert!(redis.command(&["SAVE"]).starts_with("+OK"));
    let mut c = check_for(&format!("address: {}", redis.address()));
    redis.restart();
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Loading, "{err}");
    until_healthy(&mut c, STEP).await;
    assert!(redis.info("keyspace").contains("keys=1000"));
}

#[tokio::test]
async fn replica_without_its_master_and_stale_data_off_is_master_down() {
    let dead = support::free_port().to_string();
    let replica = Redis::start(&["--replicaof", "127.0.0.1", &dead, "--replica-serve-stale-data", "no"]);
    let mut c = check_for(&format!("address: {}", replica.address()));
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::MasterDown, "{err}");
}

#[tokio::test]
async fn busy_script_is_busy_and_script_kill_recovers() {
    let redis = Redis::start(&["--busy-reply-threshold", "100"]);
    let mut c = check_for(&format!("address: {}", redis.address()));
    probe(&mut c).await.unwrap();
    // A script that never ends, sent on its own connection (its reply comes only when killed).
    let mut script = std::net::TcpStream::connect(("127.0.0.1", redis.port())).unwrap();
    std::io::Write::write_all(&mut script, b"*3\r\n$4\r\nEVAL\r\n$17\r\nwhile true do end\r\n$1\r\n0\r\n").unwrap();
    let start = Instant::now();
    let err = loop {
        match probe(&mut c).await {
            Err(e) => break e,
            Ok(()) if start.elapsed() < STEP => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(()) => panic!("the script never made the server busy"),
        }
    };
    assert_eq!(err.cause, Cause::Busy, "{err}");
    assert!(redis.command(&["SCRIPT", "KILL"]).starts_with("+OK"));
    until_healthy(&mut c, STEP).await;
}

#[tokio::test]
async fn database_out_of_range_is_a_server_error() {
    let redis = Redis::start(&["--databases", "4"]);
    let mut ok = check_for(&format!("address: {}\ndb: 3", redis.address()));
    probe(&mut ok).await.unwrap();
    let mut bad = check_for(&format!("address: {}\ndb: 4", redis.address()));
    let err = probe(&mut bad).await.unwrap_err();
    assert_eq!(err.cause, Cause::ServerError, "{err}");
}

#[tokio::test]
async fn killed_server_is_refused_and_the_same_check_recovers_after_restart() {
    let mut redis = Redis::start(&[]);
    let mut c = check_for(&format!("address: {}", redis.address()));
    probe(&mut c).await.unwrap();
    redis.kill();
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::Refused, "{err}");
    redis.restart();
    probe(&mut c).await.unwrap();
}

#[tokio::test]
async fn frozen_server_times_out_within_the_deadline_and_recovers_when_thawed() {
    let mut redis = Redis::start(&[]);
    let mut c = check_for(&format!("address: {}", redis.address()));
    probe(&mut c).await.unwrap();
    redis.freeze();
    for _ in 0..2 {
        // First on the open connection, then on a fresh one the kernel accepts for the frozen process.
        let start = Instant::now();
        let err = c.check(start + Duration::from_millis(500)).await.unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err.cause, Cause::ReadTimeout | Cause::ConnectTimeout), "{err}");
        assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(750), "took {took:?}");
    }
    redis.thaw();
    until_healthy(&mut c, STEP).await;
}

#[tokio::test]
async fn replica_is_not_master_when_a_master_is_required() {
    let master = Redis::start(&[]);
    let replica = Redis::replica_of(&master, &[]);
    let mut plain = check_for(&format!("address: {}", replica.address()));
    probe(&mut plain).await.unwrap();
    let mut strict = check_for(&format!("address: {}\nrequire_role: master", replica.address()));
    let err = probe(&mut strict).await.unwrap_err();
    assert_eq!(err.cause, Cause::NotMaster, "{err}");
    assert!(err.message.contains(&format!("replica of 127.0.0.1:{}", master.port())), "{err}");
    let mut on_master = check_for(&format!("address: {}\nrequire_role: primary", master.address()));
    probe(&mut on_master).await.unwrap();
}

#[tokio::test]
async fn idle_connection_closed_by_server_timeout_is_not_an_outage() {
    let redis = Redis::start(&["--timeout", "1"]);
    let mut c = check_for(&format!("address: {}", redis.address()));
    probe(&mut c).await.unwrap();
    // Each INFO is a connection of its own, counted in both fields it reads.
    let stat = |section: &str, field: &str| info_field(&redis.info(section), field).unwrap().parse::<u64>().unwrap();
    for i in 0..3 {
        // Redis closes idle clients from a cron that runs late on a loaded
        // machine: wait until it has really closed ours (only the INFO
        // connection itself is left).
        eventually("the server closed the idle check connection", STEP, || async {
            (stat("clients", "connected_clients") == 1).then_some(())
        })
        .await;
        let before = stat("stats", "total_connections_received");
        probe(&mut c).await.unwrap_or_else(|e| panic!("check {i} after an idle close failed: {e}"));
        // The check reconnected (1) and the second INFO connected (1).
        assert_eq!(stat("stats", "total_connections_received") - before, 2, "check {i}");
    }
}

#[tokio::test]
async fn host_name_is_resolved_at_connect() {
    // redis binds 127.0.0.1 only; where `localhost` also resolves to ::1 that
    // address is refused and the next one tried (check::net proves the
    // every-address rule itself).
    let redis = Redis::start(&[]);
    let mut c = check_for(&format!("address: localhost:{}", redis.port()));
    probe(&mut c).await.unwrap();
}

#[tokio::test]
async fn close_sends_quit_and_the_server_drops_the_client() {
    let redis = Redis::start(&[]);
    let mut c = check_for(&format!("address: {}", redis.address()));
    probe(&mut c).await.unwrap();
    let clients = || info_field(&redis.info("clients"), "connected_clients").unwrap();
    eventually("the check's connection and the INFO one", STEP, || async { (clients() == "2").then_some(()) }).await;
    c.close(Instant::now() + TIMEOUT).await;
    eventually("the server to drop the check's client", STEP, || async { (clients() == "1").then_some(()) }).await;
}

#[tokio::test]
async fn sentinel_failover_is_followed_to_the_promoted_replica() {
    let mut master = Redis::start(&[]);
    let replica = Redis::replica_of(&master, &[]);
    let sentinel = Redis::sentinel(&master, "hgmaster", 1, None);
    let mut c = check_for(&format!("sentinel:\n  addresses: [\"{}\"]\n  master_name: hgmaster", sentinel.address()));
    probe(&mut c).await.unwrap();
    assert_eq!(c.details().current_master, Some(master.address()));

    master.kill();
    let started = Instant::now();
    let err = probe(&mut c).await.unwrap_err();
    assert!(matches!(err.cause, Cause::Refused | Cause::Reset), "{err}");
    assert!(err.message.contains(&master.address()), "{err}");

    let took = until_healthy(&mut c, Duration::from_secs(30)).await;
    assert_eq!(c.details().current_master, Some(replica.address()), "sentinel log:\n{}", sentinel.log());
    assert!(replica.command(&["ROLE"]).contains("master"));
    eprintln!("failover followed {took:?} after the kill ({:?} in all)", started.elapsed());
}

#[tokio::test]
async fn a_dead_sentinel_is_skipped_for_the_next_one() {
    let master = Redis::start(&[]);
    let sentinel = Redis::sentinel(&master, "hgmaster", 0, None);
    let dead = format!("127.0.0.1:{}", support::free_port());
    let mut c = check_for(&format!(
        "sentinel:\n  addresses: [\"{dead}\", \"{}\"]\n  master_name: hgmaster",
        sentinel.address()
    ));
    probe(&mut c).await.unwrap();
    assert_eq!(c.details().current_master, Some(master.address()));
}

#[tokio::test]
async fn unknown_master_name_is_not_found() {
    let master = Redis::start(&[]);
    let sentinel = Redis::sentinel(&master, "hgmaster", 0, None);
    let mut c = check_for(&format!("sentinel:\n  addresses: [\"{}\"]\n  master_name: other", sentinel.address()));
    let err = probe(&mut c).await.unwrap_err();
    assert_eq!(err.cause, Cause::NotFound, "{err}");
}

#[tokio::test]
async fn sentinel_password_is_sent_to_the_sentinel() {
    let master = Redis::start(&[]);
    let sentinel = Redis::sentinel(&master, "hgmaster", 0, Some("sentinel-pw"));
    let base = format!("sentinel:\n  addresses: [\"{}\"]\n  master_name: hgmaster", sentinel.address());
    let err = probe(&mut check_for(&base)).await.unwrap_err();
    assert_eq!(err.cause, Cause::Auth, "{err}");
    let (_dir, file) = password_file("sentinel-pw");
    probe(&mut check_for(&format!("{base}\n  password_file: {file}"))).await.unwrap();
}

/// The length of the first complete RESP command (an array of bulk strings) in `buf`.
fn complete_command(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8], at: usize) -> Option<(usize, usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        let n = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
        Some((n, end + 2))
    }
    let (items, mut at) = line(buf, 0)?;
    for _ in 0..items {
        let (len, data) = line(buf, at)?;
        at = data + len + 2;
    }
    (buf.len() >= at).then_some(at)
}

/// A fake sentinel on an ephemeral port that names 127.0.0.1:`port` as the
/// master whatever it is asked; returns its address and a count of the
/// commands it answered.
async fn wrong_sentinel(port: u16) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let reply = format!("*2\r\n$9\r\n127.0.0.1\r\n${}\r\n{port}\r\n", port.to_string().len());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (counter, reply) = (counter.clone(), reply.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while let Some(used) = complete_command(&buf) {
                        buf.drain(..used);
                        counter.fetch_add(1, Ordering::SeqCst);
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let mut chunk = [0u8; 1024];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, asked)
}

#[tokio::test]
async fn a_sentinel_naming_the_replica_is_outvoted_by_the_others_and_never_promoted() {
    let master = Redis::start(&[]);
    let replica = Redis::replica_of(&master, &[]);
    let real: Vec<Redis> = (0..3).map(|_| Redis::sentinel(&master, "hgmaster", 1, None)).collect();
    let real_list = real.iter().map(|s| format!("\"{}\"", s.address())).collect::<Vec<_>>().join(", ");
    let dead = format!("127.0.0.1:{}", support::free_port());
    // Listed first; then listed second behind a dead sentinel, so that it is
    // the first to answer.
    for prefix in [vec![], vec![dead]] {
        let (fake, asked) = wrong_sentinel(replica.port()).await;
        let list = prefix.iter().chain([&fake]).map(|a| format!("\"{a}\", ")).collect::<String>() + &real_list;
        let mut c = check_for(&format!("sentinel:\n  addresses: [{list}]\n  master_name: hgmaster"));
        for i in 0..4 {
            probe(&mut c).await.unwrap_or_else(|e| panic!("check {i} with sentinels [{list}]: {e}"));
            assert_eq!(c.details().current_master, Some(master.address()), "check {i} with [{list}]");
        }
        // Asked once, refuted by the replica's ROLE and the other sentinels,
        // then moved behind them: never asked first again.
        assert_eq!(asked.load(Ordering::SeqCst), 1, "with [{list}]");
    }
}

#[tokio::test]
async fn sentinel_failover_is_followed_at_the_next_check_while_the_old_master_still_answers() {
    let master = Redis::start(&[]);
    let replica = Redis::replica_of(&master, &[]);
    let sentinel = Redis::sentinel(&master, "hgmaster", 1, None);
    let mut c = check_for(&format!("sentinel:\n  addresses: [\"{}\"]\n  master_name: hgmaster", sentinel.address()));
    probe(&mut c).await.unwrap();
    assert_eq!(c.details().current_master, Some(master.address()));

    assert!(sentinel.command(&["SENTINEL", "FAILOVER", "hgmaster"]).starts_with("+OK"), "{}", sentinel.log());
    let named = format!("\r\n{}\r\n", replica.port());
    eventually("the sentinel names the replica", Duration::from_secs(20), || async {
        sentinel.command(&["SENTINEL", "get-master-addr-by-name", "hgmaster"]).contains(&named).then_some(())
    })
    .await;
    // The old master is demoted by the sentinels only later (seconds); the
    // very next check must already follow the sentinel.
    let old_role = master.command(&["ROLE"]);
    let result = probe(&mut c).await;
    assert_eq!(c.details().current_master, Some(replica.address()), "old master's ROLE then: {old_role:?}");
    if let Err(e) = result {
        // The promotion may still be settling; the node checked is already the new one.
        eprintln!("first check on the promoted replica: {e}");
        until_healthy(&mut c, STEP).await;
    }
    assert_eq!(c.details().current_master, Some(replica.address()));
}
