//! Job consumers paused during an outage (docs/consumers.md): a real worker
//! reaches its broker through a `protocol: tcp` egress listener that needs
//! the database; the database (a private MariaDB behind the fault relay)
//! goes down, healthgate closes and refuses the worker's broker
//! connections, the queue grows, and once the database is back the worker
//! drains it, every message processed at least once.
//!
//! The workers are the real client libraries, run as Python processes:
//! `pika` against a private RabbitMQ node (tests/consumers/amqp_consumer.py),
//! `redis-py` against a private Redis (tests/consumers/redis_worker.py).
//! Messages are published straight to the broker, never through healthgate.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::healthgate::Healthgate;
use support::mariadb::{self, MariaDb};
use support::rabbitmq;
use support::redis::Redis;
use support::relay::{Fault, Relay};
use support::{STEP, eventually_blocking};

/// The database check's interval and fall: a dead database is seen within
/// `FALL × INTERVAL` (plus one check timeout).
const INTERVAL: Duration = Duration::from_millis(200);
const FALL: u32 = 2;
/// `reject_delay` of the egress listeners: a refused connection is held
/// 0.5-1 s, so a consumer reconnecting at once tries at most twice a second.
const REJECT_DELAY: Duration = Duration::from_secs(1);
/// How long the outage lasts once the consumer is paused (the window in which
/// nothing may be consumed and reconnects are counted).
const PAUSED_WINDOW: Duration = Duration::from_secs(4);
/// Bound on the slow steps (connects, drains) on a loaded machine.
const WITHIN: Duration = Duration::from_secs(60);
/// One message published every this long.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

/// The private database the consumers need, reached through the fault relay.
struct Database {
    _db: MariaDb,
    relay: Relay,
}

impl Database {
    async fn start() -> Database {
        let db = MariaDb::start().await;
        let relay = Relay::start(db.address().parse().unwrap());
        Database { _db: db, relay }
    }

    /// The relay stops accepting and closes what is open: the database is gone.
    fn down(&self) {
        self.relay.set_fault(Fault::Refuse);
    }

    fn up(&self) {
        self.relay.clear();
    }
}

/// healthgate with one egress listener `name` in front of `broker`, needing `db`.
fn healthgate(db: &Database, name: &str, broker: u16, reject_delay: Duration) -> Healthgate {
    let cfg = format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: {name}\n    protocol: tcp\n    \
         listen: 127.0.0.1:0\n    upstream: \"127.0.0.1:{broker}\"\n    needs: [db]\n    on_outage: close_existing\n    \
         reject_delay: {}ms\ndependencies:\n  - name: db\n    type: mysql\n    address: \"{}\"\n    user: {}\n    \
         password_env: HG_DB_PASSWORD\n    interval: {}ms\n    timeout: 1s\n    rise: 1\n    fall: {FALL}\n",
        reject_delay.as_millis(),
        db.relay.addr,
        mariadb::USER,
        INTERVAL.as_millis(),
    );
    let hg = Healthgate::start_with_env(&cfg, &[("HG_DB_PASSWORD", mariadb::PASSWORD)]);
    hg.wait_state("in_service", WITHIN);
    hg
}

/// A sample of the `/metrics` page: `series` is the name with its labels.
fn metric(hg: &Healthgate, series: &str) -> f64 {
    let (_, body) = hg.admin_get("/metrics");
    let prefix = format!("{series} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no series {series} in:\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

fn paused(hg: &Healthgate, listener: &str) -> bool {
    metric(hg, &format!("healthgate_tcp_paused{{listener=\"{listener}\"}}")) == 1.0
}

fn outage_closes(hg: &Healthgate, listener: &str) -> f64 {
    metric(hg, &format!("healthgate_tcp_outage_closes_total{{listener=\"{listener}\"}}"))
}

fn refused(hg: &Healthgate, listener: &str) -> f64 {
    metric(hg, &format!("healthgate_tcp_connections_total{{listener=\"{listener}\",outcome=\"rejected\"}}"))
}

fn accepted(hg: &Healthgate, listener: &str) -> f64 {
    metric(hg, &format!("healthgate_tcp_connections_total{{listener=\"{listener}\",outcome=\"accepted\"}}"))
}

/// A consumer script, its stdout lines collected with the instant each came; killed on drop.
struct Consumer {
    child: Mutex<Child>,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Consumer {
    fn start(script: &str, args: &[String]) -> Consumer {
        let path = format!("{}/tests/consumers/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Consumer { child: Mutex::new(child), lines }
    }

    /// Lines starting with `word`, after it.
    fn lines(&self, word: &str) -> Vec<(Instant, String)> {
        let prefix = format!("{word} ");
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|(at, l)| {
                if l == word {
                    Some((*at, String::new()))
                } else {
                    l.strip_prefix(&prefix).map(|rest| (*at, rest.to_string()))
                }
            })
            .collect()
    }

    fn count(&self, word: &str) -> usize {
        self.lines(word).len()
    }

    /// The messages processed (first word after GOT), in order.
    fn got(&self) -> Vec<String> {
        self.lines("GOT").into_iter().map(|(_, rest)| rest.split(' ').next().unwrap().to_string()).collect()
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut(&Consumer) -> bool) {
        let deadline = Instant::now() + WITHIN;
        while !done(self) {
            if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                panic!("consumer exited ({status}) while waiting for {what}; output:\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WITHIN:?} waiting for {what}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines[lines.len().saturating_sub(30)..].iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Publishes `m0`, `m1`, … every [`PUBLISH_EVERY`] on its own thread until stopped.
struct Publisher {
    published: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    /// Runs `publish(i)` for each message; it returns once the broker has it.
    fn start(mut publish: impl FnMut(usize) + Send + 'static) -> Publisher {
        let published = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (published.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                publish(p.load(Ordering::Relaxed));
                p.fetch_add(1, Ordering::Relaxed);
                next += PUBLISH_EVERY;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Publisher { published, stop, thread: Some(thread) }
    }

    fn published(&self) -> usize {
        self.published.load(Ordering::Relaxed)
    }

    /// Stops and returns how many were published.
    fn stop(&mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("publisher thread");
        }
        self.published()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a run through one outage measured.
#[derive(Debug)]
struct Outcome {
    /// From the database going down to healthgate closing the consumer's connection.
    paused_after: Duration,
    /// Connection attempts the consumer's own loop made while paused (a
    /// client library may retry inside one: redis-py does), and the
    /// refusals healthgate counted (every attempt).
    attempts_while_paused: usize,
    refused_while_paused: f64,
    /// Queue depth when paused and at the end of the window.
    depth: (u64, u64),
    /// From the database coming back to the first message consumed, and to an empty queue.
    resumed_after: Duration,
    #[allow(dead_code)] // reported (Debug), bounded by the wait for it
    drained_after: Duration,
    published: usize,
    /// Published messages never processed.
    lost: Vec<String>,
    /// Messages processed more than once.
    duplicates: usize,
}

/// The scenario both brokers share: consume, take the database down, check
/// the consumer is paused, bring it back, check the queue drains.
fn outage_cycle(
    db: &Database,
    hg: &Healthgate,
    listener: &str,
    consumer: &Consumer,
    publisher: &mut Publisher,
    depth: impl Fn() -> u64,
) -> Outcome {
    consumer.wait_for("the consumer to process 30 messages", |c| c.got().len() >= 30);

    let down = Instant::now();
    let closes_before = outage_closes(hg, listener);
    db.down();
    eventually_blocking("the consumer's broker connection to be closed", WITHIN, || {
        (outage_closes(hg, listener) > closes_before).then_some(())
    });
    let paused_after = down.elapsed();
    eventually_blocking("healthgate_tcp_paused = 1", STEP, || paused(hg, listener).then_some(()));

    // Paused: nothing more is consumed while the queue grows; the consumer's
    // reconnect attempts are refused, and bounded by the hold.
    let consumed = consumer.got().len();
    let (attempts, refused_before) = (consumer.count("ATTEMPT"), refused(hg, listener));
    let depth_paused = depth();
    std::thread::sleep(PAUSED_WINDOW);
    let depth_end = depth();
    assert_eq!(consumer.got().len(), consumed, "nothing is consumed while the database is down");
    assert!(paused(hg, listener));
    let attempts_while_paused = consumer.count("ATTEMPT") - attempts;
    let refused_while_paused = refused(hg, listener) - refused_before;

    let accepted_before = accepted(hg, listener);
    let up = Instant::now();
    db.up();
    eventually_blocking("healthgate_tcp_paused = 0", WITHIN, || (!paused(hg, listener)).then_some(()));
    // (redis-py reconnects inside the library: the consumption and the
    // listener's counter show it, the script's CONNECTED line may not.)
    consumer.wait_for("the consumer to consume again", |c| c.got().len() > consumed);
    let resumed_after = up.elapsed();
    assert!(accepted(hg, listener) > accepted_before, "it connected again through the listener");
    let published = publisher.stop();
    eventually_blocking("the queue to drain", WITHIN, || (depth() == 0).then_some(()));
    let drained_after = up.elapsed();
    // The queue is empty: what is not processed within a few more seconds
    // (the last deliveries in flight) is lost; the caller judges that.
    let all_processed = |c: &Consumer| {
        let got: std::collections::HashSet<String> = c.got().into_iter().collect();
        (0..published).all(|i| got.contains(&format!("m{i}")))
    };
    let settle = Instant::now() + Duration::from_secs(10);
    while !all_processed(consumer) && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in consumer.got() {
        *seen.entry(m).or_default() += 1;
    }
    let lost = (0..published).map(|i| format!("m{i}")).filter(|m| !seen.contains_key(m)).collect();
    let duplicates = seen.values().map(|n| n - 1).sum();
    Outcome {
        paused_after,
        attempts_while_paused,
        refused_while_paused,
        depth: (depth_paused, depth_end),
        resumed_after,
        drained_after,
        published,
        lost,
        duplicates,
    }
}

/// Checks what every outage run must show (loss is checked by each test).
fn assert_paused_and_bounded(o: &Outcome) {
    // Detection (fall × interval, plus a check timeout) and the close;
    // generous for a loaded machine, the measured value is printed.
    let bound = INTERVAL * FALL + Duration::from_secs(1) + Duration::from_secs(5);
    assert!(o.paused_after <= bound, "the consumer was paused only after {:?}: {o:?}", o.paused_after);
    assert!(o.depth.1 >= o.depth.0 + 20, "the queue grows while the consumer is paused: {o:?}");
    assert!(o.published as u64 >= o.depth.1, "what waited in the queue was published: {o:?}");
    // Each refused connection is held at least REJECT_DELAY / 2, and the
    // consumer waits for it before its next attempt.
    let most = (PAUSED_WINDOW.as_secs_f64() / (REJECT_DELAY.as_secs_f64() / 2.0)).ceil() as usize + 2;
    assert!(o.refused_while_paused >= 1.0, "the consumer kept trying while paused: {o:?}");
    assert!(o.attempts_while_paused <= most, "reconnects while paused are bounded by the hold: {o:?}");
    assert!(o.refused_while_paused <= most as f64, "refusals counted by healthgate are bounded too: {o:?}");
    // Recovery is seen at the next check (rise 1); the attempt being held
    // then is served, or the next one (at most one hold later) is.
    let back = INTERVAL + Duration::from_secs(1) + REJECT_DELAY + Duration::from_secs(5);
    assert!(o.resumed_after <= back, "consumption resumes within a check and a hold of recovery: {o:?}");
}

// === RabbitMQ ===

async fn amqp_channel(port: u16) -> (lapin::Connection, lapin::Channel) {
    let uri = format!("amqp://{}:{}@127.0.0.1:{port}/%2f", rabbitmq::USER, rabbitmq::PASSWORD);
    let conn = tokio::time::timeout(STEP, lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()))
        .await
        .expect("lapin connect in time")
        .expect("lapin connect");
    let ch = tokio::time::timeout(STEP, conn.create_channel()).await.unwrap().unwrap();
    (conn, ch)
}

/// Declares a durable queue straight on the broker; returns its depth probe.
async fn declare(port: u16, queue: &str) -> u64 {
    let (conn, ch) = amqp_channel(port).await;
    let opts = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    let q =
        tokio::time::timeout(STEP, ch.queue_declare(queue.into(), opts, Default::default())).await.unwrap().unwrap();
    let _ = tokio::time::timeout(STEP, conn.close(200, "bye".into())).await;
    u64::from(q.message_count())
}

/// A publisher straight to the broker, with publisher confirms: a message
/// counts as published once the broker confirmed it.
fn amqp_publisher(port: u16, queue: &str) -> Publisher {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (conn, ch) = rt.block_on(async {
        let (conn, ch) = amqp_channel(port).await;
        ch.confirm_select(Default::default()).await.unwrap();
        (conn, ch)
    });
    let queue = queue.to_string();
    Publisher::start(move |i| {
        let _keep = &conn;
        rt.block_on(async {
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            let confirm = tokio::time::timeout(
                STEP,
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    Default::default(),
                    format!("m{i}").as_bytes(),
                    props,
                ),
            )
            .await
            .expect("publish in time")
            .expect("publish");
            let confirm = tokio::time::timeout(STEP, confirm).await.expect("confirm in time").expect("confirm");
            assert!(confirm.is_ack(), "the broker confirms m{i}");
        });
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_consumer_is_paused_while_the_database_is_down_and_drains_the_queue_after_nothing_lost() {
    let _guard = rabbitmq::shared().await;
    let node = rabbitmq::node();
    let db = Database::start().await;
    let queue = format!("jobs-{}", std::process::id());
    declare(node.port, &queue).await;
    let port = node.port;
    let q = queue.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let hg = healthgate(&db, "amqp", port, REJECT_DELAY);
        let egress = hg.listeners[0];
        let consumer = Consumer::start(
            "amqp_consumer.py",
            &[
                "127.0.0.1".into(),
                egress.port().to_string(),
                q.clone(),
                rabbitmq::USER.into(),
                rabbitmq::PASSWORD.into(),
            ],
        );
        consumer.wait_for("the consumer to connect through healthgate", |c| c.count("CONNECTED") >= 1);
        let mut publisher = amqp_publisher(port, &q);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let depth = || rt.block_on(declare(port, &q));
        let o = outage_cycle(&db, &hg, "amqp", &consumer, &mut publisher, depth);
        assert!(accepted(&hg, "amqp") >= 2.0, "the consumer connected through the listener before and after");
        o
    })
    .await
    .unwrap();
    eprintln!("amqp outcome: {outcome:?}");
    assert_paused_and_bounded(&outcome);
    assert!(outcome.lost.is_empty(), "every published message is processed: {outcome:?}");
}

// === Redis ===

/// `RPUSH`es on one connection straight to the Redis server.
fn redis_publisher(addr: SocketAddr, queue: &str) -> Publisher {
    let mut conn = std::net::TcpStream::connect_timeout(&addr, STEP).unwrap();
    conn.set_read_timeout(Some(STEP)).unwrap();
    let queue = queue.to_string();
    Publisher::start(move |i| {
        let m = format!("m{i}");
        let cmd = format!("*3\r\n$5\r\nRPUSH\r\n${}\r\n{queue}\r\n${}\r\n{m}\r\n", queue.len(), m.len());
        conn.write_all(cmd.as_bytes()).unwrap();
        // ":<length>\r\n"
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            conn.read_exact(&mut byte).expect("RPUSH reply");
            reply.push(byte[0]);
        }
        assert_eq!(reply[0], b':', "RPUSH answered {:?}", String::from_utf8_lossy(&reply));
    })
}

fn llen(redis: &Redis, key: &str) -> u64 {
    let reply = redis.command(&["LLEN", key]);
    reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("LLEN answered {reply:?}"))
}

async fn redis_outage(mode: &str) -> Outcome {
    let db = Database::start().await;
    tokio::task::spawn_blocking({
        let mode = mode.to_string();
        move || {
            let redis = Redis::start(&[]);
            let hg = healthgate(&db, "jobs", redis.port(), REJECT_DELAY);
            let consumer = Consumer::start(
                "redis_worker.py",
                &["127.0.0.1".into(), hg.listeners[0].port().to_string(), "jobs".into(), mode, "w1".into()],
            );
            consumer.wait_for("the worker to connect through healthgate", |c| c.count("CONNECTED") >= 1);
            let mut publisher = redis_publisher(redis.address().parse().unwrap(), "jobs");
            let o = outage_cycle(&db, &hg, "jobs", &consumer, &mut publisher, || llen(&redis, "jobs"));
            assert_eq!(llen(&redis, "jobs:processing:w1"), 0, "nothing left in the processing list");
            o
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_blmove_worker_is_paused_while_the_database_is_down_and_resumes_with_nothing_lost() {
    let outcome = redis_outage("blmove").await;
    eprintln!("redis blmove outcome: {outcome:?}");
    assert_paused_and_bounded(&outcome);
    assert!(outcome.lost.is_empty(), "the reliable-queue pattern loses nothing: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_blpop_worker_is_paused_and_resumes_losing_at_most_the_message_in_flight_at_the_close() {
    let outcome = redis_outage("blpop").await;
    eprintln!("redis blpop outcome: {outcome:?}");
    assert_paused_and_bounded(&outcome);
    // One close: at most the one reply in flight to the worker when its connection was cut.
    assert!(outcome.lost.len() <= 1, "BLPOP loses at most the message in flight: {outcome:?}");
    assert_eq!(outcome.duplicates, 0, "BLPOP never processes twice: {outcome:?}");
}

// === The hold (reject_delay), with a TCP dependency the test controls ===

/// healthgate with an egress listener in front of an echo server, needing `dep`.
fn held_healthgate(dep: SocketAddr, upstream: SocketAddr, extra: &str) -> Healthgate {
    Healthgate::start(&held_config(dep, upstream, extra))
}

fn held_config(dep: SocketAddr, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\ndrain:\n  delay: 1s\n  timeout: 5s\nlisteners:\n  - name: egress\n    protocol: tcp\n    \
         listen: 127.0.0.1:0\n    upstream: \"{upstream}\"\n    needs: [dep]\n{extra}dependencies:\n  - name: dep\n    \
         type: tcp\n    address: \"{dep}\"\n    interval: 100ms\n    timeout: 500ms\n    rise: 1\n    fall: 1\n"
    )
}

/// Connects and sends a greeting; the connection's read timeout is `STEP`.
fn client(hg: &Healthgate) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect_timeout(&hg.listeners[0], STEP).expect("connect");
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(b"hello").unwrap();
    s
}

/// Reads until EOF (or an error); returns what came and when it ended.
fn read_to_end(s: &mut std::net::TcpStream) -> (Vec<u8>, Instant) {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    (out, Instant::now())
}

fn held(hg: &Healthgate) -> f64 {
    metric(hg, "healthgate_tcp_held_connections{listener=\"egress\"}")
}

#[test]
fn a_refused_connection_is_held_between_half_and_all_of_reject_delay_then_closed() {
    let mut dep = support::Dep::up();
    let echo = support::relay::Backend::start(support::relay::Speaks::Echo(Vec::new()));
    let hg = held_healthgate(dep.addr, echo.addr, "    reject_delay: 1s\n");
    hg.wait_state("in_service", WITHIN);
    eventually_blocking("healthgate_tcp_paused = 0", STEP, || (!paused(&hg, "egress")).then_some(()));
    let paused_events = hg.events("tcp listener paused").len();
    dep.kill();
    hg.wait_state("out_of_service", WITHIN);
    eventually_blocking("healthgate_tcp_paused = 1", STEP, || paused(&hg, "egress").then_some(()));
    eventually_blocking("the pause to be logged", STEP, || {
        (hg.events("tcp listener paused").len() > paused_events).then_some(())
    });

    let before = refused(&hg, "egress");
    let start = Instant::now();
    let mut s = client(&hg);
    eventually_blocking("the connection to be held", STEP, || (held(&hg) == 1.0).then_some(()));
    let (got, ended) = read_to_end(&mut s);
    let took = ended - start;
    assert!(got.is_empty(), "a refused connection never reaches the upstream");
    assert!(took >= Duration::from_millis(500), "held at least half of reject_delay, was {took:?}");
    assert!(took < Duration::from_millis(1000) + Duration::from_secs(2), "closed after the hold, took {took:?}");
    eventually_blocking("the refusal to be counted", STEP, || (refused(&hg, "egress") == before + 1.0).then_some(()));
    assert_eq!(held(&hg), 0.0, "the hold slot is returned");
    // Both workers saw the pause; it was logged once.
    assert_eq!(hg.events("tcp listener paused").len(), paused_events + 1, "one event per transition");
}

#[test]
fn a_held_connection_is_served_when_the_dependency_recovers_during_the_hold() {
    let mut dep = support::Dep::up();
    let echo = support::relay::Backend::start(support::relay::Speaks::Echo(Vec::new()));
    let hg = held_healthgate(dep.addr, echo.addr, "    reject_delay: 30s\n");
    hg.wait_state("in_service", WITHIN);
    dep.kill();
    hg.wait_state("out_of_service", WITHIN);
    let (refused_before, accepted_before) = (refused(&hg, "egress"), accepted(&hg, "egress"));

    let mut s = client(&hg);
    eventually_blocking("the connection to be held", STEP, || (held(&hg) == 1.0).then_some(()));
    dep.revive();
    // The bytes sent while held reach the upstream and come back.
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).expect("the echo of what was sent while held");
    assert_eq!(&buf, b"hello");
    assert_eq!(held(&hg), 0.0);
    assert_eq!(accepted(&hg, "egress"), accepted_before + 1.0, "counted once, as accepted");
    assert_eq!(refused(&hg, "egress"), refused_before, "and not as refused");
}

#[test]
fn beyond_reject_hold_max_a_refused_connection_is_closed_at_once() {
    let mut dep = support::Dep::up();
    let echo = support::relay::Backend::start(support::relay::Speaks::Echo(Vec::new()));
    let hg = held_healthgate(dep.addr, echo.addr, "    reject_delay: 30s\n    reject_hold_max: 1\n");
    hg.wait_state("in_service", WITHIN);
    dep.kill();
    hg.wait_state("out_of_service", WITHIN);

    let _first = client(&hg);
    eventually_blocking("the first connection to be held", STEP, || (held(&hg) == 1.0).then_some(()));
    let start = Instant::now();
    let mut second = client(&hg);
    let (got, ended) = read_to_end(&mut second);
    assert!(got.is_empty());
    assert!(ended - start < Duration::from_secs(5), "the second is not held: {:?}", ended - start);
    assert_eq!(held(&hg), 1.0, "the first is still held");
}

#[test]
fn the_drain_ends_held_connections_when_it_stops_accepting() {
    let mut dep = support::Dep::up();
    let echo = support::relay::Backend::start(support::relay::Speaks::Echo(Vec::new()));
    let mut hg = held_healthgate(dep.addr, echo.addr, "    reject_delay: 30s\n");
    hg.wait_state("in_service", WITHIN);
    dep.kill();
    hg.wait_state("out_of_service", WITHIN);
    let mut s = client(&hg);
    eventually_blocking("the connection to be held", STEP, || (held(&hg) == 1.0).then_some(()));
    let start = Instant::now();
    hg.signal("TERM");
    let (got, ended) = read_to_end(&mut s);
    assert!(got.is_empty());
    // drain.delay is 1 s; the hold would be 15-30 s.
    assert!(ended - start < Duration::from_secs(6), "ended by the drain, not the hold: {:?}", ended - start);
    assert!(hg.wait_exit(WITHIN).success());
}

#[test]
fn a_held_connection_is_served_when_its_needed_dependency_recovers_while_the_service_stays_out() {
    // The listener needs only `dep`; `other` keeps the service out of
    // service, so no service-state change announces `dep`'s recovery.
    let (mut dep, mut other) = (support::Dep::up(), support::Dep::up());
    let echo = support::relay::Backend::start(support::relay::Speaks::Echo(Vec::new()));
    let extra = format!(
        "    reject_delay: 30s\n  - name: unused\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\n    \
         needs: [other]\n",
        echo.addr
    );
    let cfg = held_config(dep.addr, echo.addr, &extra)
        + &format!(
            "  - name: other\n    type: tcp\n    address: \"{}\"\n    interval: 100ms\n    rise: 1\n    fall: 1\n",
            other.addr
        );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    dep.kill();
    other.kill();
    hg.wait_state("out_of_service", WITHIN);
    // `other` alone may have put the service out first: connect only once
    // `dep`, the one the listener needs, is down too.
    eventually_blocking("dep down", STEP, || {
        (metric(&hg, "healthgate_dependency_up{dependency=\"dep\",type=\"tcp\"}") == 0.0).then_some(())
    });

    let mut s = client(&hg);
    eventually_blocking("the connection to be held", STEP, || (held(&hg) == 1.0).then_some(()));
    dep.revive();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).expect("the echo of what was sent while held, long before the 15-30 s hold ends");
    assert_eq!(&buf, b"hello");
    assert_eq!(hg.state(), "out_of_service", "the service stayed out of service throughout");
}

/// Publishes one persistent message straight to the broker, confirmed (from blocking code).
fn publish_one(port: u16, queue: &str, body: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (conn, ch) = amqp_channel(port).await;
        ch.confirm_select(Default::default()).await.unwrap();
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        let confirm = ch.basic_publish("".into(), queue.into(), Default::default(), body.as_bytes(), props);
        let confirm = tokio::time::timeout(STEP, confirm).await.expect("publish in time").expect("publish");
        assert!(tokio::time::timeout(STEP, confirm).await.expect("confirm in time").expect("confirm").is_ack());
        let _ = tokio::time::timeout(STEP, conn.close(200, "bye".into())).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqps_consumer_verifies_the_real_broker_through_the_listener_and_is_paused_too() {
    let _guard = rabbitmq::shared().await;
    let node = rabbitmq::node();
    let queue = format!("tls-jobs-{}", std::process::id());
    declare(node.port, &queue).await;
    let (port, tls_port, ca) = (node.port, node.tls_port, node.pki().path("ca.pem"));
    tokio::task::spawn_blocking(move || {
        let mut dep = support::Dep::up();
        let cfg = format!(
            "workers: 2\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: amqps\n    protocol: tcp\n    \
             listen: 127.0.0.1:0\n    upstream: \"localhost:{tls_port}\"\n    needs: [dep]\n    \
             on_outage: close_existing\n    reject_delay: 1s\ndependencies:\n  - name: dep\n    type: tcp\n    \
             address: \"{}\"\n    interval: 100ms\n    rise: 1\n    fall: 1\n",
            dep.addr
        );
        let hg = Healthgate::start(&cfg);
        hg.wait_state("in_service", WITHIN);
        let consumer = Consumer::start(
            "amqp_consumer.py",
            &[
                "127.0.0.1".into(),
                hg.listeners[0].port().to_string(),
                queue.clone(),
                rabbitmq::USER.into(),
                rabbitmq::PASSWORD.into(),
                ca,
            ],
        );
        consumer.wait_for("the TLS consumer to connect through healthgate", |c| c.count("CONNECTED") >= 1);
        publish_one(port, &queue, "m0");
        consumer.wait_for("m0 over TLS", |c| c.got().contains(&"m0".to_string()));

        dep.kill();
        eventually_blocking("the TLS connection to be closed", WITHIN, || {
            (outage_closes(&hg, "amqps") >= 1.0).then_some(())
        });
        publish_one(port, &queue, "m1");
        dep.revive();
        consumer.wait_for("m1 after the outage, over TLS again", |c| c.got().contains(&"m1".to_string()));
        assert!(accepted(&hg, "amqps") >= 2.0, "connected through the listener before and after the outage");
    })
    .await
    .unwrap();
}
