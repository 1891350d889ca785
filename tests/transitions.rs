//! No request is lost when the service state flips: 32 keep-alive clients
//! send requests back to back through the real binary to a real app while a
//! critical dependency goes down and up again 20 times. Every response must
//! be the app's own answer or healthgate's intended problem+json; a reset,
//! a truncated response, a 502 or anything else fails the test. Requests
//! already in flight to the app when the state flips complete normally.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::app::App;
use support::healthgate::Healthgate;
use support::{STEP, eventually_blocking};
use tokio::io::BufReader;
use tokio::net::TcpStream;

/// Bound for a state change on a loaded 2-core machine (the checks below
/// decide within ~100 ms).
const WITHIN: Duration = Duration::from_secs(10);
const CLIENTS: usize = 32;

/// A TCP dependency the test switches off (connections refused) and on
/// (connections accepted and closed) on the same port.
struct Dep {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
}

impl Dep {
    fn up() -> Dep {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = first.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            let mut listener = Some(first);
            loop {
                match (&listener, flag.load(Ordering::SeqCst)) {
                    (Some(l), true) => {
                        l.set_nonblocking(true).unwrap();
                        match l.accept() {
                            Ok((s, _)) => drop(s),
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                    (Some(_), false) => listener = None,
                    (None, true) => listener = TcpListener::bind(addr).ok(),
                    (None, false) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Dep { addr, up }
    }

    fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

fn start(app: &App, dep: &Dep, impact: &str) -> Healthgate {
    let cfg = format!(
        "workers: 2\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: \"{}\"\n\
         dependencies:\n  - name: db\n    type: tcp\n    address: \"{}\"\n    impact: {impact}\n    interval: 50ms\n    timeout: 300ms\n    rise: 1\n    fall: 1\n    jitter: 0\n",
        app.addr, dep.addr
    );
    let hg = Healthgate::start(&cfg);
    hg.wait_state("in_service", WITHIN);
    hg
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    app: AtomicU64,
    rejected: AtomicU64,
    /// Anything else, described (first few kept).
    failures: AtomicU64,
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        let mut e = self.examples.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }
}

/// Checks one response against what healthgate may answer.
fn judge(tally: &Tally, path: &str, r: (u16, Vec<(String, String)>, Vec<u8>), reject: (u16, &str)) {
    let (status, headers, body) = r;
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if status == 200 && body == format!("app:GET {path}").as_bytes() {
        tally.app.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let problem = serde_json::from_slice::<serde_json::Value>(&body).ok();
    if status == reject.0
        && header("content-type") == Some("application/problem+json")
        && problem.as_ref().is_some_and(|p| p["cause"] == reject.1 && p["status"] == reject.0)
    {
        tally.rejected.fetch_add(1, Ordering::SeqCst);
        return;
    }
    tally.fail(format!("{status} {headers:?} {}", String::from_utf8_lossy(&body)));
}

/// Runs `CLIENTS` keep-alive clients until `stop`; each reconnects only when
/// healthgate announced `Connection: close`.
fn load(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    reject: (u16, &'static str),
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for c in 0..CLIENTS {
                let (tally, stop) = (tally.clone(), stop.clone());
                tasks.spawn(async move {
                    let mut conn: Option<BufReader<TcpStream>> = None;
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        if conn.is_none() {
                            match tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
                                Ok(Ok(s)) => conn = Some(BufReader::new(s)),
                                other => {
                                    tally.fail(format!("connect: {other:?}"));
                                    return;
                                }
                            }
                        }
                        n += 1;
                        let path = format!("/c{c}/r{n}");
                        let c = conn.as_mut().unwrap();
                        match tokio::time::timeout(STEP, support::exchange(c, &path)).await {
                            Ok(Ok(r)) => {
                                let close =
                                    r.1.iter().any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
                                judge(&tally, &path, r, reject);
                                if close {
                                    conn = None;
                                }
                            }
                            Ok(Err(e)) => {
                                tally.fail(e);
                                conn = None;
                            }
                            Err(_) => {
                                tally.fail(format!("no response within {STEP:?}"));
                                conn = None;
                            }
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
    })
}

/// Flips the dependency `flips` times under load; every response must be
/// the app's or the intended `reject` problem.
fn flips_lose_no_request(impact: &str, flips: usize, down_state: &str, reject: (u16, &'static str)) {
    let app = App::start();
    let dep = Dep::up();
    let hg = start(&app, &dep, impact);
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(hg.listeners[0], tally.clone(), stop.clone(), reject);
    for flip in 0..flips {
        // Each phase lasts until the clients have seen it, so both states
        // really are exercised under load (not just toggled between requests).
        let seen = tally.rejected.load(Ordering::SeqCst);
        dep.set(false);
        hg.wait_state(down_state, WITHIN);
        eventually_blocking(&format!("flip {flip}: a {} answer", reject.0), WITHIN, || {
            (tally.rejected.load(Ordering::SeqCst) > seen + CLIENTS as u64).then_some(())
        });
        let seen = tally.app.load(Ordering::SeqCst);
        dep.set(true);
        hg.wait_state("in_service", WITHIN);
        eventually_blocking(&format!("flip {flip}: app answers again"), WITHIN, || {
            (tally.app.load(Ordering::SeqCst) > seen + CLIENTS as u64).then_some(())
        });
    }
    stop.store(true, Ordering::SeqCst);
    clients.join().unwrap();
    let (ok, rejected, failed) = (
        tally.app.load(Ordering::SeqCst),
        tally.rejected.load(Ordering::SeqCst),
        tally.failures.load(Ordering::SeqCst),
    );
    println!("{flips} flips ({impact}): {ok} app answers, {rejected} × {}, {failed} failures", reject.0);
    assert_eq!(failed, 0, "lost or wrong responses, e.g.: {:#?}", tally.examples.lock().unwrap());
}

#[test]
fn twenty_outages_under_load_lose_no_request() {
    flips_lose_no_request("out_of_service", 20, "out_of_service", (503, "OUT OF SERVICE"));
}

#[test]
fn degraded_flips_under_load_lose_no_request() {
    flips_lose_no_request("degraded", 5, "degraded", (500, "Internal Server Error"));
}

#[test]
fn requests_in_flight_when_the_state_flips_get_the_apps_answer() {
    let app = App::start();
    let dep = Dep::up();
    let hg = start(&app, &dep, "out_of_service");
    let addr = hg.listeners[0];
    // Slow enough that the outage below is detected while they wait.
    app.set_delay(Duration::from_secs(3));
    let in_flight: Vec<_> = (0..8)
        .map(|i| std::thread::spawn(move || support::healthgate::http_get(addr, &format!("/slow/{i}"))))
        .collect();
    eventually_blocking("8 requests at the app", WITHIN, || (app.requests() >= 8).then_some(()));
    dep.set(false);
    hg.wait_state("out_of_service", WITHIN);
    assert!(in_flight.iter().all(|t| !t.is_finished()), "the app answered before the flip; raise its delay");
    let (status, body) = support::healthgate::http_get(addr, "/new");
    assert_eq!(status, 503, "a new request during the outage: {body}");
    for (i, r) in in_flight.into_iter().enumerate() {
        assert_eq!(r.join().unwrap(), (200, format!("app:GET /slow/{i}")));
    }
}
