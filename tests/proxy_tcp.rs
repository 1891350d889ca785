//! The tcp (L4) listener, in-process: a real `serve` on its own worker thread
//! (current-thread runtime + LocalSet, like the server's workers) in front of
//! real upstreams on ephemeral loopback ports: an echo server, purpose-built
//! servers for half-close and bulk transfers, and a private redis-server
//! driven with redis-cli.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use healthgate::config::Config;
use healthgate::metrics::{ListenerLabels, Metrics, TcpBytesLabels, TcpOutcomeLabels};
use healthgate::proxy::{ListenerCtx, tcp};
use healthgate::state::{DepHealth, DepStatus, Health, ServiceState};
use support::{STEP, eventually, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};

/// Index of the `out_of_service` dependency in every test config.
const DB: usize = 0;
/// Index of the `degraded` dependency.
const CACHE: usize = 1;
/// Index of a second `out_of_service` dependency.
const OTHER: usize = 2;

/// A tcp listener served on its own worker thread.
struct Proxy {
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    drain: watch::Sender<Option<Instant>>,
    done: Option<oneshot::Receiver<()>>,
}

impl Proxy {
    /// Starts a `protocol: tcp` listener in front of `upstream`; `extra` are
    /// further listener keys (indented four spaces). Every dependency starts up.
    fn start(upstream: SocketAddr, extra: &str) -> Proxy {
        let yaml = format!(
            "listeners:\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: \"{upstream}\"\n{extra}\
             dependencies:\n  - name: db\n    type: tcp\n    address: 127.0.0.1:1\n    impact: out_of_service\n\
             \x20 - name: cache\n    type: tcp\n    address: 127.0.0.1:1\n    impact: degraded\n\
             \x20 - name: other\n    type: tcp\n    address: 127.0.0.1:1\n    impact: out_of_service\n"
        );
        let config = Config::from_yaml(&yaml, Path::new("test.yaml")).expect("valid config");
        let health = Health::new(&config);
        let metrics = Metrics::new(&config);
        set(&health, DB, DepHealth::Up);
        set(&health, CACHE, DepHealth::Up);
        set(&health, OTHER, DepHealth::Up);
        let ctx = ListenerCtx::new(&config, 0, health.clone(), metrics.clone());
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let (drain, drain_rx) = watch::channel(None);
        let (done_tx, done) = oneshot::channel();
        let (h, m) = (health.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("hg-test-worker".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    // The aggregator publishes the service state `close_existing` reacts to.
                    tokio::task::spawn_local(healthgate::monitor::aggregate(h, m));
                    let listener = TcpListener::from_std(socket).unwrap();
                    tcp::serve(listener, healthgate::proxy::live(ctx), drain_rx).await;
                    let _ = done_tx.send(());
                });
            })
            .unwrap();
        Proxy { addr, health, metrics, drain, done: Some(done) }
    }

    async fn connect(&self) -> TcpStream {
        timeout(STEP, TcpStream::connect(self.addr)).await.expect("connect in time").expect("connect")
    }

    fn connections(&self, outcome: &str) -> u64 {
        let labels = TcpOutcomeLabels { listener: "l4".into(), outcome: outcome.into() };
        self.metrics.tcp_connections.get_or_create(&labels).get()
    }

    fn bytes(&self, direction: &str) -> u64 {
        let labels = TcpBytesLabels { listener: "l4".into(), direction: direction.into() };
        self.metrics.tcp_bytes.get_or_create(&labels).get()
    }

    fn active(&self) -> i64 {
        self.metrics.active_connections("l4").get()
    }

    fn durations(&self) -> u64 {
        self.metrics.tcp_connection_duration.get_or_create(&ListenerLabels { listener: "l4".into() }).count()
    }

    /// Waits until every connection ended and was recorded.
    async fn idle(&self) {
        eventually("no active connection", STEP, || async { (self.active() == 0).then_some(()) }).await;
    }

    /// Waits for `serve` to return.
    async fn returned(&mut self) {
        let done = self.done.take().expect("not awaited yet");
        timeout(STEP, done).await.expect("serve returns in time").expect("serve thread alive");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Stop the worker thread at once (drain with no grace).
        self.drain.send_replace(Some(Instant::now()));
    }
}

fn set(health: &Health, index: usize, state: DepHealth) {
    health.publish(index, DepStatus { state, ..DepStatus::unknown() });
}

/// An echo server: each connection gets back what it sends, then a FIN after
/// the client's FIN.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A port on which nothing listens.
fn dead_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    timeout(STEP, s.write_all(msg)).await.expect("write in time").expect("write");
    let mut back = vec![0u8; msg.len()];
    timeout(STEP, s.read_exact(&mut back)).await.expect("echo in time").expect("echo");
    assert_eq!(back, msg);
}

/// Reads once; the result tells how the proxy ended the connection.
async fn read_end(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut buf = [0u8; 64];
    timeout(STEP, s.read(&mut buf)).await.expect("the proxy must end the connection, not leave it hanging")
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Bytes of the connection-level tests (`in` = client → app).
const MESSAGE: &[u8] = b"hello through the tcp listener";

/// Bytes sent by the client reach the app and the app's reply reaches the
/// client; the connection's metrics are recorded when it ends.
#[tokio::test]
async fn echo_round_trips_and_metrics_count_bytes_each_way() {
    let proxy = Proxy::start(echo_server().await, "");
    let mut s = proxy.connect().await;
    for _ in 0..3 {
        round_trip(&mut s, MESSAGE).await;
    }
    drop(s);
    proxy.idle().await;
    let n = 3 * MESSAGE.len() as u64;
    assert_eq!((proxy.bytes("in"), proxy.bytes("out")), (n, n));
    assert_eq!(proxy.connections("accepted"), 1);
    assert_eq!(proxy.connections("rejected") + proxy.connections("upstream_error"), 0);
    assert_eq!(proxy.durations(), 1);
}

/// A private redis-server, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(name: &str) -> String {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/usr/bin"]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p.to_string_lossy().into_owned();
        }
    }
    panic!("{name} not found in PATH or /usr/sbin: install redis-server (apt-get install redis-server)");
}

async fn start_redis() -> Redis {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(binary("redis-server"))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let redis = Redis { child, port, _dir: dir };
    eventually("private redis accepts connections", STEP, || async move {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        (&buf == b"+PONG\r\n").then_some(())
    })
    .await;
    redis
}

/// Runs redis-cli against `port` and returns its trimmed stdout.
async fn redis_cli(port: u16, args: &[&str]) -> String {
    let mut cmd = Command::new(binary("redis-cli"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args);
    let out = timeout(STEP, tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("redis-cli in time")
        .unwrap()
        .expect("run redis-cli");
    assert!(out.status.success(), "redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A real client speaking a real protocol (RESP) through the listener.
#[tokio::test]
async fn redis_cli_talks_to_a_private_redis_through_the_listener() {
    let redis = start_redis().await;
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)), "");
    let port = proxy.addr.port();
    assert_eq!(redis_cli(port, &["ping"]).await, "PONG");
    assert_eq!(redis_cli(port, &["set", "greeting", "hello via healthgate"]).await, "OK");
    assert_eq!(redis_cli(port, &["get", "greeting"]).await, "hello via healthgate");
    // The value really is in the private redis, not an artefact of the proxy.
    assert_eq!(redis_cli(redis.port, &["get", "greeting"]).await, "hello via healthgate");
    proxy.idle().await;
    assert_eq!(proxy.connections("accepted"), 3);
}

/// 32 MiB each way at the same time arrive intact, and the byte counters
/// match exactly.
#[tokio::test]
async fn large_transfers_both_ways_arrive_intact() {
    const LEN: usize = 32 << 20;
    let to_app = noise(LEN, 0x9e37_79b9_7f4a_7c15);
    let to_client = noise(LEN, 0xd1b5_4a32_d192_ed03);
    // The app sends its stream while reading the client's, then reports what it got.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    let (got_tx, got_rx) = oneshot::channel();
    let reply = to_client.clone();
    tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        let mut got = Vec::with_capacity(LEN);
        let (read, wrote) = tokio::join!(r.read_to_end(&mut got), async {
            w.write_all(&reply).await?;
            w.shutdown().await
        });
        read.unwrap();
        wrote.unwrap();
        let _ = got_tx.send(got);
    });
    let proxy = Proxy::start(app_addr, "");
    let mut s = proxy.connect().await;
    let (mut r, mut w) = s.split();
    let mut got = Vec::with_capacity(LEN);
    let (read, wrote) = timeout(Duration::from_secs(120), async {
        tokio::join!(r.read_to_end(&mut got), async {
            w.write_all(&to_app).await?;
            w.shutdown().await
        })
    })
    .await
    .expect("transfer in time");
    read.unwrap();
    wrote.unwrap();
    let app_got = timeout(STEP, got_rx).await.expect("app done").unwrap();
    assert!(got == to_client, "client received {} bytes that differ from what the app sent", got.len());
    assert!(app_got == to_app, "app received {} bytes that differ from what the client sent", app_got.len());
    drop(s);
    proxy.idle().await;
    assert_eq!((proxy.bytes("in"), proxy.bytes("out")), (LEN as u64, LEN as u64));
}

/// The client shuts its sending side down and still receives the app's
/// whole reply, which the app sends only after seeing end-of-stream.
#[tokio::test]
async fn half_close_forwards_eof_and_keeps_the_reply_flowing() {
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let reply = format!("received {} bytes: {}", got.len(), String::from_utf8_lossy(&got)).repeat(1000);
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let proxy = Proxy::start(app_addr, "");
    let mut s = proxy.connect().await;
    s.write_all(MESSAGE).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = Vec::new();
    timeout(STEP, s.read_to_end(&mut reply)).await.expect("reply in time").unwrap();
    let expected = format!("received {} bytes: {}", MESSAGE.len(), String::from_utf8_lossy(MESSAGE)).repeat(1000);
    assert_eq!(String::from_utf8(reply).unwrap(), expected);
}

/// While a needed dependency is down, a new connection is closed at once
/// (FIN: the client reads end-of-stream) and counted as rejected; after
/// recovery connections are relayed again.
#[tokio::test]
async fn outage_closes_new_connections_at_once_and_recovery_admits_again() {
    let proxy = Proxy::start(echo_server().await, "");
    set(&proxy.health, DB, DepHealth::Down);
    let mut s = proxy.connect().await;
    let started = Instant::now();
    assert_eq!(read_end(&mut s).await.expect("a clean close, not a reset"), 0);
    assert!(started.elapsed() < Duration::from_secs(2), "rejection took {:?}", started.elapsed());
    assert_eq!(proxy.connections("rejected"), 1);
    assert_eq!(proxy.connections("accepted"), 0);

    set(&proxy.health, DB, DepHealth::Up);
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    assert_eq!(proxy.connections("accepted"), 1);
    assert_eq!(proxy.connections("rejected"), 1);
}

/// With `reject: reset` the client sees ECONNRESET at once.
#[tokio::test]
async fn outage_resets_new_connections_with_reject_reset() {
    let proxy = Proxy::start(echo_server().await, "    reject: reset\n");
    set(&proxy.health, DB, DepHealth::Down);
    let started = Instant::now();
    // The RST can beat the client's connect to completion: then connect
    // itself reports the reset (the kernel's SO_ERROR), else the first read.
    let err = match timeout(STEP, TcpStream::connect(proxy.addr)).await.expect("connect in time") {
        Ok(mut s) => read_end(&mut s).await.expect_err("a reset, not a clean close"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "rejection took {:?}", started.elapsed());
    assert_eq!(proxy.connections("rejected"), 1);
}

/// A down `degraded` dependency admits connections by default and rejects
/// them with `admit_degraded: false`.
#[tokio::test]
async fn degraded_admits_by_default_and_rejects_when_configured() {
    let echo = echo_server().await;
    let admitting = Proxy::start(echo, "");
    set(&admitting.health, CACHE, DepHealth::Down);
    let mut s = admitting.connect().await;
    round_trip(&mut s, MESSAGE).await;

    let strict = Proxy::start(echo, "    admit_degraded: false\n");
    set(&strict.health, CACHE, DepHealth::Down);
    let mut s = strict.connect().await;
    assert_eq!(read_end(&mut s).await.expect("a clean close"), 0);
    assert_eq!(strict.connections("rejected"), 1);
}

/// By default (`on_outage: keep`) an established connection keeps working
/// through an outage while new ones are rejected.
#[tokio::test]
async fn existing_connections_survive_an_outage_by_default() {
    let proxy = Proxy::start(echo_server().await, "");
    let mut kept = proxy.connect().await;
    round_trip(&mut kept, MESSAGE).await;
    set(&proxy.health, DB, DepHealth::Down);
    let mut fresh = proxy.connect().await;
    assert_eq!(read_end(&mut fresh).await.expect("a clean close"), 0);
    round_trip(&mut kept, MESSAGE).await;
}

/// `on_outage: close_existing` closes established connections when the
/// service goes out of service.
#[tokio::test]
async fn close_existing_closes_open_connections_on_outage() {
    let proxy = Proxy::start(echo_server().await, "    on_outage: close_existing\n    reject: reset\n");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    set(&proxy.health, DB, DepHealth::Down);
    let err = read_end(&mut s).await.expect_err("closed with a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    proxy.idle().await;
    assert_eq!(proxy.durations(), 1);
}

/// `close_existing` follows the listener's own `needs`: an outage of a
/// dependency it does not need leaves its connections alone, and one of a
/// needed dependency closes them even when the service state does not change
/// (it already was out of service).
#[tokio::test]
async fn close_existing_follows_the_listeners_needs() {
    let proxy = Proxy::start(echo_server().await, "    needs: [db]\n    on_outage: close_existing\n");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    set(&proxy.health, OTHER, DepHealth::Down);
    eventually("the service state shows the outage", STEP, || async {
        (proxy.health.service_state().0 == ServiceState::OutOfService).then_some(())
    })
    .await;
    round_trip(&mut s, MESSAGE).await;
    let mut fresh = proxy.connect().await;
    round_trip(&mut fresh, MESSAGE).await;

    set(&proxy.health, DB, DepHealth::Down);
    assert_eq!(read_end(&mut s).await.expect("a clean close (reject: close)"), 0);
    assert_eq!(read_end(&mut fresh).await.expect("a clean close (reject: close)"), 0);
}

/// A connection with no traffic either way for `idle_timeout` is closed; one
/// that keeps trading bytes is not.
#[tokio::test]
async fn idle_timeout_closes_quiet_connections_only() {
    let proxy = Proxy::start(echo_server().await, "    idle_timeout: 400ms\n");
    let mut busy = proxy.connect().await;
    let mut quiet = proxy.connect().await;
    round_trip(&mut quiet, MESSAGE).await;
    // Pacing, not synchronisation: traffic every 100 ms for 1 s keeps `busy` open.
    for _ in 0..10 {
        round_trip(&mut busy, MESSAGE).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read_end(&mut quiet).await.expect("a clean close"), 0);
    round_trip(&mut busy, MESSAGE).await;
    let started = Instant::now();
    assert_eq!(read_end(&mut busy).await.expect("a clean close"), 0);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(350), "closed after only {waited:?} of silence");
}

/// When the app cannot be reached the client is closed promptly and the
/// connection counts as `upstream_error`.
#[tokio::test]
async fn unreachable_upstream_closes_the_client_and_counts_upstream_error() {
    let proxy = Proxy::start(dead_port(), "");
    let mut s = proxy.connect().await;
    let started = Instant::now();
    assert_eq!(read_end(&mut s).await.expect("a clean close (reject: close)"), 0);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(proxy.connections("upstream_error"), 1);
    assert_eq!(proxy.connections("accepted"), 0);
    proxy.idle().await;
}

/// Drain: new connections are refused at once, an established one keeps
/// working until the client ends it, then `serve` returns.
#[tokio::test]
async fn drain_refuses_new_connections_and_waits_for_existing_ones() {
    let mut proxy = Proxy::start(echo_server().await, "");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    proxy.drain.send_replace(Some(Instant::now() + Duration::from_secs(60)));
    let addr = proxy.addr;
    eventually("new connections refused", STEP, || async move {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    })
    .await;
    round_trip(&mut s, MESSAGE).await;
    assert!(proxy.done.as_mut().unwrap().try_recv().is_err(), "serve returned with a connection open");
    s.shutdown().await.unwrap();
    assert_eq!(read_end(&mut s).await.unwrap(), 0);
    drop(s);
    proxy.returned().await;
}

/// Drain: connections still open at the deadline are closed and `serve`
/// returns.
#[tokio::test]
async fn drain_deadline_closes_remaining_connections() {
    let mut proxy = Proxy::start(echo_server().await, "");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    proxy.drain.send_replace(Some(Instant::now() + Duration::from_millis(300)));
    proxy.returned().await;
    assert_eq!(read_end(&mut s).await.expect("a clean close"), 0);
    assert_eq!(proxy.active(), 0);
    assert_eq!(proxy.durations(), 1);
}

/// At `max_connections` a further client waits (it is not rejected) and is
/// served as soon as a slot frees up.
#[tokio::test]
async fn max_connections_makes_extra_clients_wait_for_a_slot() {
    let proxy = Proxy::start(echo_server().await, "    max_connections: 1\n");
    let mut first = proxy.connect().await;
    round_trip(&mut first, MESSAGE).await;
    let mut second = proxy.connect().await;
    second.write_all(MESSAGE).await.unwrap();
    let mut buf = vec![0u8; MESSAGE.len()];
    // The one timed negative check: nothing may come back while the slot is taken.
    assert!(
        timeout(Duration::from_millis(300), second.read_exact(&mut buf)).await.is_err(),
        "the second client was served beyond max_connections"
    );
    assert_eq!(proxy.active(), 1);
    drop(first);
    timeout(STEP, second.read_exact(&mut buf)).await.expect("served once the slot freed up").unwrap();
    assert_eq!(buf, MESSAGE);
    assert_eq!(proxy.connections("rejected"), 0);
}

/// The whole path in-process: the real server with two workers (one
/// `SO_REUSEPORT` socket each) and a real monitor checking a tcp dependency
/// the test controls. Killing the dependency makes new connections get
/// rejected; restoring it admits them again; SIGTERM's drain returns.
#[tokio::test]
async fn a_real_dependency_outage_gates_the_listener_across_workers() {
    let echo = echo_server().await;
    let dep = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dep_addr = dep.local_addr().unwrap();
    let yaml = format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\ndrain:\n  delay: 0s\n  timeout: 5s\n\
         listeners:\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: \"{echo}\"\n\
         dependencies:\n  - name: db\n    type: tcp\n    address: \"{dep_addr}\"\n    interval: 100ms\n    timeout: 500ms\n    rise: 1\n    fall: 1\n"
    );
    let config = Config::from_yaml(&yaml, Path::new("test.yaml")).expect("valid config");
    let running = healthgate::server::start(config).expect("server starts");
    let addr = running.listeners[0];

    // Several connections, so both workers' sockets are exercised.
    let relayed = || async move {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(MESSAGE).await.ok()?;
        let mut back = vec![0u8; MESSAGE.len()];
        s.read_exact(&mut back).await.ok()?;
        (back == MESSAGE).then_some(())
    };
    eventually("in service: relayed", STEP, relayed).await;
    for _ in 0..8 {
        timeout(STEP, relayed()).await.unwrap().expect("relayed while in service");
    }

    drop(dep);
    let rejected = || async move {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let mut buf = [0u8; 1];
        // An admitted connection (to the echo server) stays silent: bound the wait.
        let n = timeout(Duration::from_millis(500), s.read(&mut buf)).await.ok()?.ok()?;
        (n == 0).then_some(())
    };
    eventually("out of service: rejected", STEP, rejected).await;
    for _ in 0..8 {
        timeout(STEP, rejected()).await.unwrap().expect("every worker rejects while out of service");
    }

    let _dep = std::net::TcpListener::bind(dep_addr).expect("re-bind the dependency's port");
    eventually("recovered: relayed again", STEP, relayed).await;

    let metrics = running.metrics.clone();
    timeout(STEP, running.drain(std::future::pending())).await.expect("drain completes");
    let count = |o: &str| {
        metrics.tcp_connections.get_or_create(&TcpOutcomeLabels { listener: "l4".into(), outcome: o.into() }).get()
    };
    assert!(
        count("accepted") >= 10 && count("rejected") >= 9,
        "accepted {} rejected {}",
        count("accepted"),
        count("rejected")
    );
}

/// An echo app that reports how each connection ended on its side: the
/// result of the read that ended it (`Ok(0)` for a FIN, an error for a reset).
async fn observing_echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<std::io::Result<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let end = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break Ok(0),
                        Ok(n) => {
                            if let Err(e) = s.write_all(&buf[..n]).await {
                                break Err(e);
                            }
                        }
                        Err(e) => break Err(e),
                    }
                };
                let _ = tx.send(end);
            });
        }
    });
    (addr, rx)
}

/// How the app side of the one relayed connection ended.
async fn app_end(ends: &mut mpsc::UnboundedReceiver<std::io::Result<usize>>) -> std::io::Result<usize> {
    timeout(STEP, ends.recv()).await.expect("the app's connection ends in time").expect("an app connection")
}

/// A session cut by `on_outage: close_existing` with `reject: reset` is reset
/// towards both ends: the client and the app each read ECONNRESET, so
/// neither can take the cut-off stream for a complete one.
#[tokio::test]
async fn close_existing_resets_the_cut_session_towards_the_client_and_the_app() {
    let (app, mut ends) = observing_echo_server().await;
    let proxy = Proxy::start(app, "    on_outage: close_existing\n    reject: reset\n");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    set(&proxy.health, DB, DepHealth::Down);
    let client = read_end(&mut s).await.expect_err("the client sees a reset");
    assert_eq!(client.kind(), std::io::ErrorKind::ConnectionReset, "{client}");
    let app = app_end(&mut ends).await.expect_err("the app sees a reset, not a FIN");
    assert_eq!(app.kind(), std::io::ErrorKind::ConnectionReset, "{app}");
}

/// With `reject: close` a cut session still ends with a FIN to the client
/// (the operator's choice for clients), but the app gets a reset.
#[tokio::test]
async fn close_existing_with_reject_close_still_resets_the_app() {
    let (app, mut ends) = observing_echo_server().await;
    let proxy = Proxy::start(app, "    on_outage: close_existing\n");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    set(&proxy.health, DB, DepHealth::Down);
    assert_eq!(read_end(&mut s).await.expect("a clean close (reject: close)"), 0);
    let app = app_end(&mut ends).await.expect_err("the app sees a reset, not a FIN");
    assert_eq!(app.kind(), std::io::ErrorKind::ConnectionReset, "{app}");
}

/// A session still open at the drain deadline, with `reject: reset`, is
/// reset towards both ends.
#[tokio::test]
async fn the_drain_deadline_resets_open_sessions_towards_the_client_and_the_app() {
    let (app, mut ends) = observing_echo_server().await;
    let mut proxy = Proxy::start(app, "    reject: reset\n");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    proxy.drain.send_replace(Some(Instant::now() + Duration::from_millis(300)));
    proxy.returned().await;
    let client = read_end(&mut s).await.expect_err("the client sees a reset");
    assert_eq!(client.kind(), std::io::ErrorKind::ConnectionReset, "{client}");
    let app = app_end(&mut ends).await.expect_err("the app sees a reset, not a FIN");
    assert_eq!(app.kind(), std::io::ErrorKind::ConnectionReset, "{app}");
    assert_eq!(proxy.durations(), 1, "a cut session is still recorded");
}

/// A TCP listener has no HTTP requests, so it exports no request series.
#[tokio::test]
async fn a_tcp_listener_exports_no_http_request_series() {
    let proxy = Proxy::start(echo_server().await, "");
    let mut s = proxy.connect().await;
    round_trip(&mut s, MESSAGE).await;
    let text = proxy.metrics.render_prometheus();
    assert!(text.contains("healthgate_tcp_connections_total{listener=\"l4\""), "{text}");
    for series in ["healthgate_requests_total{", "healthgate_request_duration_seconds_bucket{"] {
        assert!(!text.contains(series), "a TCP listener exports {series}:\n{text}");
    }
}
