//! Fleet-aware readiness and herd-safe recovery, end to end: five real
//! healthgate processes on loopback, each reaching one private MariaDB
//! through its own fault relay, peers found through a peer file written once
//! every instance has bound its (ephemeral) admin port.
//!
//! Why a peer file: the admin ports are only known after start (port 0), and
//! choosing ports in the test by binding and releasing them races with every
//! other process on the machine. `fleet.peers.file` is re-read every
//! `resolve_interval`, so the list can be given after start.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use support::healthgate::{Healthgate, http_get, http_request};
use support::mariadb::{MariaDb, PASSWORD, USER};
use support::relay::{Fault, Relay};

/// Check timing: fall 2 × 300 ms.
const INTERVAL_MS: u64 = 300;
const FALL: u64 = 2;
/// Peer round.
const POLL_MS: u64 = 500;
/// How long a failure most peers do not see keeps a pod Ready.
const SETTLE_MS: u64 = 3000;
/// Slack for a loaded 2-core machine running debug builds.
const SLACK: Duration = Duration::from_secs(10);

struct Fleet {
    db: MariaDb,
    relays: Vec<Relay>,
    nodes: Vec<Healthgate>,
    peers_file: PathBuf,
    _dir: tempfile::TempDir,
}

fn config(i: usize, relay: SocketAddr, password_file: &Path, peers_file: &Path) -> String {
    format!(
        "workers: 1
admin:
  listen: 127.0.0.1:0
  ready_when_out_of_service: false
listeners:
  - name: web
    listen: 127.0.0.1:0
    upstream: 127.0.0.1:1
dependencies:
  - name: db
    type: mysql
    address: {relay}
    user: {USER}
    password_file: {pw}
    interval: {INTERVAL_MS}ms
    timeout: 500ms
    rise: 2
    fall: {FALL}
fleet:
  instance_id: hg-{i}
  peers:
    file: {peers}
  resolve_interval: 300ms
  poll_interval: {POLL_MS}ms
  timeout: 1s
  freshness: 3s
  settle: {SETTLE_MS}ms
  readiness: shared_outage
",
        pw = password_file.display(),
        peers = peers_file.display(),
    )
}

impl Fleet {
    async fn start(n: usize) -> Fleet {
        let db = tokio::time::timeout(Duration::from_secs(120), MariaDb::start()).await.expect("mariadb start");
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        let peers_file = dir.path().join("peers");
        std::fs::write(&peers_file, "").unwrap();
        let target: SocketAddr = db.address().parse().unwrap();
        let relays: Vec<Relay> = (0..n).map(|_| Relay::start(target)).collect();
        let nodes: Vec<Healthgate> = relays
            .iter()
            .enumerate()
            .map(|(i, r)| Healthgate::start(&config(i, r.addr, &password_file, &peers_file)))
            .collect();
        let list: String = nodes.iter().map(|n| format!("{}\n", n.admin)).collect();
        std::fs::write(&peers_file, list).unwrap();
        let fleet = Fleet { db, relays, nodes, peers_file, _dir: dir };
        fleet.wait_all("in service and a fresh view of every peer", |f, i| {
            let s = f.nodes[i].status();
            s["service"]["state"] == "in_service" && s["fleet"]["peers_fresh"] == n - 1
        });
        fleet
    }

    fn readyz(&self, i: usize) -> u16 {
        http_get(self.nodes[i].admin, "/readyz").0
    }

    fn wait_all(&self, what: &str, f: impl Fn(&Fleet, usize) -> bool) {
        let deadline = Instant::now() + SLACK * 3;
        loop {
            let pending: Vec<usize> = (0..self.nodes.len()).filter(|&i| !f(self, i)).collect();
            if pending.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: instances {pending:?} never got there");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A request through instance `i`'s listener: (status, content type, body).
fn request(f: &Fleet, i: usize) -> (u16, String, String) {
    let (status, head, body) =
        http_request(f.nodes[i].listeners[0], "GET /cart HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    (status, ctype, body)
}

#[tokio::test]
async fn a_failure_one_pod_sees_unreadies_only_it_and_a_shared_outage_keeps_every_pod_ready_with_503s() {
    let fleet = Fleet::start(5).await;

    // 1. Cut one relay: only that instance leaves the Service.
    let cut = Instant::now();
    fleet.relays[0].set_fault(Fault::Refuse);
    let bound = Duration::from_millis(FALL * INTERVAL_MS + 500 + SETTLE_MS + POLL_MS);
    loop {
        for i in 1..5 {
            assert_eq!(fleet.readyz(i), 200, "instance {i} left the Service for instance 0's failure");
        }
        if fleet.readyz(0) == 503 {
            break;
        }
        assert!(cut.elapsed() < bound + SLACK, "instance 0 still ready {:?} after its cut", cut.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("local failure: /readyz 503 after {:?} (fall × interval + timeout + settle = {bound:?})", cut.elapsed());
    // It keeps short-circuiting while it is still in the Service.
    let (status, ctype, body) = request(&fleet, 0);
    assert_eq!((status, ctype.as_str()), (503, "application/problem+json"), "{body}");
    // The fleet loop logs the change at its next evaluation (every 250 ms at most).
    support::eventually_blocking("the local failure event", SLACK, || {
        (!fleet.nodes[0].events("fleet verdict: local failure").is_empty()).then_some(())
    });
    let verdicts = fleet.nodes[0].events("fleet verdict: local failure");
    assert_eq!(verdicts.len(), 1, "one event per verdict change: {verdicts:?}");
    assert_eq!(verdicts[0]["dependency"], "db", "{verdicts:?}");
    for i in 1..5 {
        assert!(fleet.nodes[i].events("fleet verdict: local failure").is_empty(), "instance {i}");
    }
    let status = fleet.nodes[0].status();
    assert_eq!(status["fleet"]["dependencies"][0]["verdict"], "local_failure", "{status}");
    assert_eq!(status["fleet"]["dependencies"][0]["peers_up"], 4, "{status}");

    fleet.relays[0].clear();
    fleet.wait_all("back in service", |f, i| f.readyz(i) == 200 && f.nodes[i].state() == "in_service");

    // 2. Cut every relay: a shared outage. Every /readyz stays 200 the whole
    //    time, and requests get the clean 503 problem+json.
    let cut = Instant::now();
    for r in &fleet.relays {
        r.set_fault(Fault::Refuse);
    }
    let mut all_out = None;
    while cut.elapsed() < Duration::from_millis(FALL * INTERVAL_MS + SETTLE_MS * 2) + Duration::from_secs(3) {
        for i in 0..5 {
            assert_eq!(fleet.readyz(i), 200, "instance {i} failed readiness {:?} into a shared outage", cut.elapsed());
        }
        if all_out.is_none() && (0..5).all(|i| fleet.nodes[i].state() == "out_of_service") {
            all_out = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(all_out.is_some(), "not every instance saw the outage");
    for i in 0..5 {
        let (status, ctype, body) = request(&fleet, i);
        assert_eq!((status, ctype.as_str()), (503, "application/problem+json"), "instance {i}: {body}");
        assert!(body.contains("OUT OF SERVICE"), "{body}");
        let s = fleet.nodes[i].status();
        assert_eq!(s["fleet"]["dependencies"][0]["verdict"], "shared_outage", "instance {i}: {s}");
        assert_eq!(s["service"]["ready"], true, "{s}");
    }

    // 3. Restore: every instance back in service.
    for r in &fleet.relays {
        r.clear();
    }
    fleet.wait_all("in service after the outage", |f, i| f.readyz(i) == 200 && f.nodes[i].state() == "in_service");
    assert!(fleet.db.connections().await > 0);
}

#[tokio::test]
async fn with_every_peer_unreachable_each_pod_falls_back_to_its_local_settings() {
    let fleet = Fleet::start(5).await;
    for r in &fleet.relays {
        r.set_fault(Fault::Refuse);
    }
    fleet.wait_all("shared outage seen", |f, i| {
        f.nodes[i].status()["fleet"]["dependencies"][0]["verdict"] == "shared_outage"
    });
    for i in 0..5 {
        assert_eq!(fleet.readyz(i), 200, "instance {i}");
    }
    // The peers go away: closed ports (bound, then released), and one peer
    // that accepts and never answers.
    let dead: Vec<SocketAddr> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()).collect();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut list: String = dead.iter().map(|a| format!("{a}\n")).collect();
    list.push_str(&format!("{}\n", silent.local_addr().unwrap()));
    let gone = Instant::now();
    std::fs::write(&fleet.peers_file, list).unwrap();
    // ready_when_out_of_service: false, as without a fleet.
    fleet.wait_all("local settings: not ready while out of service", |f, i| f.readyz(i) == 503);
    eprintln!("peers unreachable: every /readyz 503 after {:?}", gone.elapsed());
    for i in 0..5 {
        let s = fleet.nodes[i].status();
        assert_eq!(s["fleet"]["dependencies"][0]["verdict"], "alone", "{s}");
        assert_eq!(s["fleet"]["peers_fresh"], 0, "{s}");
        // Still answering requests itself.
        assert_eq!(request(&fleet, i).0, 503);
    }
    // Checks kept their pace while every peer call failed or hung.
    let before: Vec<u64> = fleet.nodes.iter().map(checks).collect();
    std::thread::sleep(Duration::from_millis(INTERVAL_MS * 6));
    for (i, (node, before)) in fleet.nodes.iter().zip(before).enumerate() {
        let ran = checks(node) - before;
        assert!(ran >= 2, "instance {i} ran {ran} checks in {} ms", INTERVAL_MS * 6);
    }
    for r in &fleet.relays {
        r.clear();
    }
    fleet.wait_all("in service without peers", |f, i| f.readyz(i) == 200 && f.nodes[i].state() == "in_service");
    drop(silent);
}

fn checks(node: &Healthgate) -> u64 {
    node.status()["dependencies"][0]["checks_total"].as_u64().unwrap()
}

/// An instance's view is served unauthenticated, read-only, with verdicts
/// only: no address, no message.
#[tokio::test]
async fn the_fleet_view_shows_verdicts_and_nothing_else() {
    let fleet = Fleet::start(2).await;
    fleet.relays[1].set_fault(Fault::Refuse);
    fleet.wait_all("instance 1 down", |f, i| i == 0 || f.nodes[1].state() == "out_of_service");
    let (code, body) = http_get(fleet.nodes[1].admin, "/fleet/view");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["instance"], "hg-1");
    assert_eq!(v["dependencies"][0]["name"], "db");
    assert_eq!(v["dependencies"][0]["state"], "down");
    let relay = fleet.relays[1].addr.to_string();
    assert!(!body.contains(&relay) && !body.contains("127.0.0.1") && !body.contains("refused"), "{body}");
    let (code, _, _) = http_request(
        fleet.nodes[1].admin,
        "POST /fleet/view HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 405);
}

/// Slow start under a steady stream of requests: after the dependency comes
/// back, the admitted share follows the ramp (loose bounds: the pure ramp
/// and the admission sequence are unit-tested to ±1 point).
#[test]
fn after_a_recovery_the_admitted_share_ramps_from_the_floor_to_every_request() {
    let app = support::app::App::start();
    let mut dep = support::Dep::up();
    const WINDOW_MS: u64 = 6000;
    let hg = Healthgate::start(&format!(
        "workers: 1
admin:
  listen: 127.0.0.1:0
short_circuit:
  retry_after: 2s
  retry_after_spread: 3s
listeners:
  - name: web
    listen: 127.0.0.1:0
    upstream: {app}
dependencies:
  - name: db
    type: tcp
    address: {dep}
    interval: 100ms
    timeout: 200ms
    rise: 1
    fall: 1
    slow_start:
      window: {WINDOW_MS}ms
      floor: 0.1
",
        app = app.addr,
        dep = dep.addr
    ));
    hg.wait_state("in_service", SLACK);
    // The first verdict is no recovery: every request is admitted.
    assert!((0..20).all(|_| http_get(hg.listeners[0], "/").0 == 200));
    dep.kill();
    hg.wait_state("out_of_service", SLACK);
    dep.revive();
    // A constant request stream, timestamped; the ramp's start is when the
    // dependency turned up (the log event), read after the run.
    let mut results: Vec<(SystemTime, bool)> = Vec::new();
    let mut retry_after = std::collections::BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(WINDOW_MS * 13 / 10) + Duration::from_secs(2) {
        let (code, head, body) =
            http_request(hg.listeners[0], "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(code == 200 || code == 503, "{code}");
        if code == 503 {
            // The usual short-circuit answer, its Retry-After spread over 2..=5 s.
            let head = head.to_ascii_lowercase();
            assert!(head.contains("content-type: application/problem+json") && body.contains("OUT OF SERVICE"));
            let value = head.lines().find_map(|l| l.strip_prefix("retry-after:")).expect("Retry-After");
            retry_after.insert(value.trim().parse::<u64>().unwrap());
        }
        results.push((SystemTime::now(), code == 200));
    }
    assert!(retry_after.len() > 1 && retry_after.iter().all(|s| (2..=5).contains(s)), "{retry_after:?}");
    let up = hg.events("dependency up");
    let up_at = up.last().expect("an up event")["timestamp"].as_str().unwrap().to_string();
    let up_at = humantime::parse_rfc3339(&up_at).unwrap();
    let share_between = |from: f64, to: f64| {
        let window = Duration::from_millis(WINDOW_MS);
        let in_range: Vec<bool> = results
            .iter()
            .filter(|(t, _)| {
                let since = t.duration_since(up_at).unwrap_or_default();
                since >= window.mul_f64(from) && since < window.mul_f64(to)
            })
            .map(|(_, ok)| *ok)
            .collect();
        assert!(in_range.len() >= 20, "only {} requests between {from} and {to} of the window", in_range.len());
        in_range.iter().filter(|ok| **ok).count() as f64 / in_range.len() as f64
    };
    let ramp = |at: f64| 0.1 + 0.9 * at.min(1.0);
    for (from, to) in [(0.05, 0.15), (0.45, 0.55), (1.05, 1.2)] {
        let got = share_between(from, to);
        let want = ramp((from + to) / 2.0);
        eprintln!(
            "admitted {:.1} % at {:.0} % of the window (ramp {:.1} %)",
            got * 100.0,
            (from + to) * 50.0,
            want * 100.0
        );
        assert!((got - want).abs() <= 0.05, "admitted {got:.3} between {from} and {to} of the window; ramp {want:.3}");
    }
    let metrics = hg.admin_get("/metrics").1;
    assert!(metrics.contains("healthgate_slow_start_admitted_ratio{dependency=\"db\"} 1"), "{metrics}");
}
