//! Fleet-aware readiness: each instance serves a small view of its verdicts
//! to its peers ([`view`]), polls a bounded random sample of them every
//! `poll_interval` ([`peers`]), and turns the fresh views into a verdict per
//! dependency ([`policy`], pure): with `readiness: shared_outage`, a
//! failure most peers also see keeps the pod Ready (it answers 503 itself),
//! one they do not see fails its readiness, and with no fresh views the
//! local settings decide exactly as without a fleet.
//!
//! Runs on its own thread (`hg-fleet`): a slow or dead peer, or a slow DNS
//! answer, never delays a check or a request. `/readyz` reads the consensus
//! from atomics and decides at request time, so a local verdict change is
//! reflected at once. [`ramp`] is the slow-start ramp used by `state`.

pub mod peers;
pub mod policy;
pub mod ramp;
pub mod view;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{Config, FleetConfig, FleetReadiness, Impact};
use crate::metrics::{DependencyLabels, Metrics, PeerCountLabels, PeerOutcomeLabels, VerdictLabels};
use crate::state::{DepHealth, Force, Health, age};
use policy::{Consensus, Tally, Verdict};
use view::View;

/// Longest pause of the evaluation loop: a verdict that changes with time
/// alone (settling → local failure) is noticed within it.
const EVALUATE_EVERY: Duration = Duration::from_millis(250);

/// One known peer address.
#[derive(Debug, Default)]
struct Peer {
    /// The id it reported (none before its first view).
    instance: Option<String>,
    /// It reported this instance's own id: never asked again.
    is_self: bool,
    /// Its last view and when it arrived.
    view: Option<(Instant, View)>,
    /// The outcome of its last failed call, if the last call failed.
    last_error: Option<&'static str>,
}

/// What the loop knows, behind one lock (held only for in-memory work).
#[derive(Debug)]
struct Table {
    peers: BTreeMap<SocketAddr, Peer>,
    resolved: Option<SystemTime>,
    resolve_error: Option<String>,
    /// Per dependency: the last tally and verdict (for `/status` and the log).
    tallies: Vec<Tally>,
    verdicts: Vec<Verdict>,
}

/// The fleet state of this instance.
pub struct Fleet {
    config: FleetConfig,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Per dependency: how long a failure most peers do not see keeps the pod Ready.
    settle: Vec<Duration>,
    /// Per dependency: whether it is `out_of_service` (the only impact the policy is about).
    critical: Vec<bool>,
    /// Per dependency: [`Consensus::to_u8`], read by `/readyz` without the lock.
    consensus: Vec<AtomicU8>,
    /// When the consensus was last evaluated (ms since `clock`): a stuck
    /// loop's stale consensus is ignored.
    evaluated_ms: AtomicU64,
    clock: Instant,
    table: Mutex<Table>,
}

impl Fleet {
    /// The fleet state for a config with a `fleet` section.
    pub fn new(fleet: FleetConfig, config: &Config, health: Arc<Health>, metrics: Arc<Metrics>) -> Arc<Fleet> {
        let n = config.dependencies.len();
        let settle = config
            .dependencies
            .iter()
            .map(|d| fleet.settle.unwrap_or(d.interval + d.timeout + fleet.poll_interval))
            .collect();
        for d in &config.dependencies {
            for v in Verdict::ALL {
                let labels = VerdictLabels { dependency: d.name.clone(), verdict: v.as_str().into() };
                metrics.fleet.verdict.get_or_create(&labels).set((v == Verdict::Healthy) as i64);
            }
            metrics.fleet.peers_up_ratio.get_or_create(&DependencyLabels { dependency: d.name.clone() }).set(0.0);
        }
        Arc::new(Fleet {
            settle,
            critical: config.dependencies.iter().map(|d| d.impact == Impact::OutOfService).collect(),
            consensus: (0..n).map(|_| AtomicU8::new(Consensus::None.to_u8())).collect(),
            evaluated_ms: AtomicU64::new(0),
            clock: Instant::now(),
            table: Mutex::new(Table {
                peers: BTreeMap::new(),
                resolved: None,
                resolve_error: None,
                tallies: vec![Tally::default(); n],
                verdicts: vec![Verdict::Healthy; n],
            }),
            config: fleet,
            health,
            metrics,
        })
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.config.instance_id
    }

    /// The JSON body of `GET /fleet/view`.
    pub fn view_json(&self) -> Vec<u8> {
        serde_json::to_vec(&view::view(&self.config.instance_id, &self.health)).unwrap_or_default()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The consensus on dependency `i`, or none when the loop has not
    /// evaluated within `freshness` (then the local settings decide).
    fn consensus(&self, i: usize) -> Consensus {
        let last = Duration::from_millis(self.evaluated_ms.load(Ordering::Relaxed));
        if self.clock.elapsed().saturating_sub(last) > self.config.freshness {
            return Consensus::None;
        }
        Consensus::from_u8(self.consensus[i].load(Ordering::Relaxed))
    }

    /// What this pod makes of dependency `i` now.
    fn verdict(&self, i: usize, consensus: Consensus) -> Verdict {
        match self.health.force(i) {
            // An operator's verdict is about this pod: the fleet has no say.
            Some(Force::Up) => Verdict::Healthy,
            Some(Force::Down) => Verdict::Alone,
            None => {
                let s = self.health.deps()[i].status();
                let down_for = (s.state == DepHealth::Down).then(|| age(s.since));
                policy::verdict(down_for, consensus, self.settle[i])
            }
        }
    }

    /// `/readyz` while out of service; `fallback` is `ready_when_out_of_service`.
    pub fn ready_out_of_service(&self, fallback: bool) -> bool {
        if self.config.readiness != FleetReadiness::SharedOutage {
            return fallback;
        }
        let verdicts =
            (0..self.critical.len()).filter(|&i| self.critical[i]).map(|i| self.verdict(i, self.consensus(i)));
        policy::ready_out_of_service(verdicts, fallback)
    }

    /// The `fleet` object of `/status`.
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let t = self.table();
        let deps: Vec<_> = self
            .health
            .deps()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let tally = t.tallies[i];
                json!({
                    "name": d.name,
                    "consensus": self.consensus(i),
                    "verdict": t.verdicts[i],
                    "peers_fresh": tally.fresh,
                    "peers_up": tally.up,
                    "peers_down": tally.down,
                    "peers_up_ratio": tally.up_share(),
                    "settle_seconds": self.settle[i].as_secs_f64(),
                })
            })
            .collect();
        let peers: Vec<_> = t
            .peers
            .iter()
            .filter(|(_, p)| !p.is_self)
            .map(|(addr, p)| {
                json!({
                    "address": addr.to_string(),
                    "instance": p.instance,
                    "view_age_seconds": p.view.as_ref().map(|(at, _)| now.saturating_duration_since(*at).as_secs_f64()),
                    "last_error": p.last_error,
                })
            })
            .collect();
        json!({
            "instance_id": self.config.instance_id,
            "readiness": self.config.readiness,
            "peers_known": peers.len(),
            "peers_fresh": self.fresh_instances(&t, now).len(),
            "resolved": t.resolved.map(|r| humantime::format_rfc3339_millis(r).to_string()),
            "resolve_error": t.resolve_error,
            "dependencies": deps,
            "peers": peers,
        })
    }

    /// The freshest view of each other instance (an instance reachable at
    /// two addresses, IPv4 and IPv6, counts once).
    fn fresh_instances<'a>(&self, t: &'a Table, now: Instant) -> HashMap<&'a str, (Instant, &'a View)> {
        let mut out: HashMap<&str, (Instant, &View)> = HashMap::new();
        for p in t.peers.values().filter(|p| !p.is_self) {
            let Some((at, v)) = &p.view else { continue };
            if now.saturating_duration_since(*at) > self.config.freshness {
                continue;
            }
            let e = out.entry(v.instance.as_str()).or_insert((*at, v));
            if *at > e.0 {
                *e = (*at, v);
            }
        }
        out
    }

    /// Recomputes each dependency's consensus and verdict; logs each verdict
    /// change once and keeps the metrics current.
    fn evaluate(&self, now: Instant) {
        let mut t = self.table();
        let fresh = self.fresh_instances(&t, now);
        let known = t.peers.values().filter(|p| !p.is_self).count();
        let fleet = &self.metrics.fleet;
        fleet.peers.get_or_create(&PeerCountLabels { state: "known".into() }).set(known as i64);
        fleet.peers.get_or_create(&PeerCountLabels { state: "fresh".into() }).set(fresh.len() as i64);
        let mut tallies = Vec::with_capacity(self.consensus.len());
        for (i, d) in self.health.deps().iter().enumerate() {
            let views = fresh
                .values()
                .filter_map(|(at, v)| v.dependencies.iter().find(|vd| vd.name == d.name).map(|vd| (*at, vd.state)));
            let tally = policy::tally(views, now, self.config.freshness);
            let prev = Consensus::from_u8(self.consensus[i].load(Ordering::Relaxed));
            let c = policy::consensus(prev, tally, self.config.min_views, self.config.hysteresis);
            self.consensus[i].store(c.to_u8(), Ordering::Relaxed);
            fleet
                .peers_up_ratio
                .get_or_create(&DependencyLabels { dependency: d.name.clone() })
                .set(tally.up_share().unwrap_or(0.0));
            tallies.push(tally);
        }
        drop(fresh);
        t.tallies = tallies;
        self.evaluated_ms.store(self.clock.elapsed().as_millis() as u64, Ordering::Relaxed);
        for (i, d) in self.health.deps().iter().enumerate() {
            let v = self.verdict(i, self.consensus(i));
            let before = std::mem::replace(&mut t.verdicts[i], v);
            if before == v {
                continue;
            }
            // `/readyz` computes it at each request; gRPC health watchers are pushed.
            self.health.readiness_inputs_changed();
            for (verdict, value) in [(before, 0), (v, 1)] {
                let labels = VerdictLabels { dependency: d.name.clone(), verdict: verdict.as_str().into() };
                fleet.verdict.get_or_create(&labels).set(value);
            }
            let tally = t.tallies[i];
            let share = tally.up_share().map_or_else(|| "none".to_string(), |s| format!("{s:.2}"));
            let applied = self.config.readiness == FleetReadiness::SharedOutage;
            match v {
                Verdict::LocalFailure => warn!(
                    dependency = %d.name, verdict = v.as_str(), from = before.as_str(), peers_fresh = tally.fresh,
                    peers_up_ratio = %share, applied,
                    "fleet verdict: local failure (most peers see the dependency up); readiness fails"
                ),
                Verdict::SharedOutage => warn!(
                    dependency = %d.name, verdict = v.as_str(), from = before.as_str(), peers_fresh = tally.fresh,
                    peers_up_ratio = %share, applied,
                    "fleet verdict: shared outage (most peers see the dependency down); staying ready, answering 503"
                ),
                _ => info!(
                    dependency = %d.name, verdict = v.as_str(), from = before.as_str(), peers_fresh = tally.fresh,
                    peers_up_ratio = %share, applied, "fleet verdict"
                ),
            }
        }
    }

    /// Re-reads the peer list and updates the table (addresses gone are
    /// forgotten, new ones start without a view).
    async fn resolve(&self) {
        let mut skipped = Vec::new();
        let result = peers::resolve(&self.config.peers, &mut skipped).await;
        let mut t = self.table();
        match result {
            Ok(addrs) => {
                let mut old = std::mem::take(&mut t.peers);
                t.peers = addrs.into_iter().map(|a| (a, old.remove(&a).unwrap_or_default())).collect();
                t.resolved = Some(SystemTime::now());
                let error = (!skipped.is_empty()).then(|| skipped.join("; "));
                if error != t.resolve_error {
                    if let Some(e) = &error {
                        warn!(skipped = %e, "fleet: some peer entries did not resolve");
                    }
                    t.resolve_error = error;
                }
            }
            Err(e) => {
                // Keep the last good list: a resolver hiccup is not an empty fleet.
                let e = e.to_string();
                if t.resolve_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "fleet: peer list not resolved; keeping the last one");
                    t.resolve_error = Some(e);
                }
            }
        }
    }

    /// One round: asks a random sample of at most `max_peers_per_round`
    /// peers (itself excluded) concurrently, each call bounded by `timeout`.
    async fn poll_round(self: Arc<Self>) {
        let candidates: Vec<SocketAddr> =
            self.table().peers.iter().filter(|(_, p)| !p.is_self).map(|(a, _)| *a).collect();
        let chosen: Vec<SocketAddr> = if candidates.len() > self.config.max_peers_per_round {
            let mut rng = rand::rng();
            rand::seq::index::sample(&mut rng, candidates.len(), self.config.max_peers_per_round)
                .into_iter()
                .map(|i| candidates[i])
                .collect()
        } else {
            candidates
        };
        let mut calls = tokio::task::JoinSet::new();
        for addr in chosen {
            let timeout = self.config.timeout;
            calls.spawn(async move { (addr, peers::fetch_view(addr, timeout).await) });
        }
        while let Some(done) = calls.join_next().await {
            let Ok((addr, result)) = done else { continue };
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.outcome(),
            };
            self.metrics.fleet.peer_requests.get_or_create(&PeerOutcomeLabels { outcome: outcome.into() }).inc();
            let mut t = self.table();
            let Some(peer) = t.peers.get_mut(&addr) else { continue };
            match result {
                Ok(v) if v.instance == self.config.instance_id => {
                    debug!(%addr, "fleet: this address is this instance; not asked again");
                    peer.is_self = true;
                    peer.view = None;
                }
                Ok(v) => {
                    peer.instance = Some(v.instance.clone());
                    peer.view = Some((Instant::now(), v));
                    peer.last_error = None;
                }
                Err(e) => {
                    debug!(%addr, error = %e, "fleet: peer view not read");
                    peer.last_error = Some(e.outcome());
                }
            }
        }
    }

    /// Runs until `stop` turns true: resolves every `resolve_interval`
    /// (static lists once), polls every `poll_interval`, evaluates at least
    /// every 250 ms. Resolution and rounds run as their own tasks, so the
    /// evaluation never waits for the network.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        info!(
            instance_id = %self.config.instance_id, readiness = ?self.config.readiness,
            poll_interval = ?self.config.poll_interval, "fleet: polling peers"
        );
        let once = matches!(self.config.peers, crate::config::PeerSource::Static(_));
        let mut resolving: Option<tokio::task::JoinHandle<()>> = None;
        let mut polling: Option<tokio::task::JoinHandle<()>> = None;
        let mut next_resolve = Instant::now();
        let mut next_poll = Instant::now();
        let mut resolved_once = false;
        loop {
            let now = Instant::now();
            if now >= next_resolve && resolving.as_ref().is_none_or(|h| h.is_finished()) && !(once && resolved_once) {
                let me = self.clone();
                resolving = Some(tokio::spawn(async move { me.resolve().await }));
                next_resolve = now + self.config.resolve_interval;
                resolved_once = true;
            }
            if now >= next_poll && polling.as_ref().is_none_or(|h| h.is_finished()) {
                polling = Some(tokio::spawn(self.clone().poll_round()));
                next_poll = now + self.config.poll_interval;
            }
            self.evaluate(now);
            let pause = EVALUATE_EVERY.min(self.config.poll_interval);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if let Some(h) = polling {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DepStatus;
    use policy::PeerState;
    use std::path::Path;

    fn fleet(readiness: &str) -> (Arc<Fleet>, Arc<Health>) {
        let yaml = format!(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n  - name: db\n    type: tcp\n    address: x:1\n    interval: 1s\n    timeout: 1s\nfleet:\n  instance_id: me\n  peers:\n    static: [\"127.0.0.1:1\"]\n  readiness: {readiness}\n  settle: 1h\n"
        );
        let c = Config::from_yaml(&yaml, Path::new("t")).unwrap();
        let h = Health::new(&c);
        let m = Metrics::new(&c);
        (Fleet::new(c.fleet.clone().unwrap(), &c, h.clone(), m), h)
    }

    fn add_view(f: &Fleet, port: u16, instance: &str, state: PeerState) {
        let v = View {
            instance: instance.into(),
            dependencies: vec![view::ViewDep { name: "db".into(), state, since: String::new() }],
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        f.table()
            .peers
            .insert(addr, Peer { instance: Some(instance.into()), view: Some((Instant::now(), v)), ..Peer::default() });
    }

    #[test]
    fn a_shared_outage_keeps_the_pod_ready_and_no_views_fall_back_to_the_local_setting() {
        let (f, h) = fleet("shared_outage");
        h.publish(0, DepStatus { state: DepHealth::Down, ..DepStatus::unknown() });
        f.evaluate(Instant::now());
        assert!(!f.ready_out_of_service(false), "no views: the local setting");
        assert!(f.ready_out_of_service(true));
        add_view(&f, 2, "b", PeerState::Down);
        add_view(&f, 3, "c", PeerState::Down);
        // The same instance at a second address counts once.
        add_view(&f, 4, "c", PeerState::Down);
        add_view(&f, 5, "d", PeerState::Up);
        f.evaluate(Instant::now());
        assert_eq!(f.table().tallies[0], Tally { fresh: 3, up: 1, down: 2 });
        assert!(f.ready_out_of_service(false), "shared outage: ready");
        assert_eq!(f.table().verdicts[0], Verdict::SharedOutage);
    }

    #[test]
    fn the_local_policy_only_observes() {
        let (f, h) = fleet("local");
        h.publish(0, DepStatus { state: DepHealth::Down, ..DepStatus::unknown() });
        add_view(&f, 2, "b", PeerState::Down);
        f.evaluate(Instant::now());
        assert_eq!(f.table().verdicts[0], Verdict::SharedOutage);
        assert!(!f.ready_out_of_service(false));
    }

    #[test]
    fn a_view_from_itself_is_not_counted() {
        let (f, h) = fleet("shared_outage");
        h.publish(0, DepStatus { state: DepHealth::Down, ..DepStatus::unknown() });
        add_view(&f, 2, "b", PeerState::Down);
        f.table().peers.get_mut(&SocketAddr::from(([127, 0, 0, 1], 2))).unwrap().is_self = true;
        f.evaluate(Instant::now());
        assert_eq!(f.table().tallies[0].fresh, 0);
        assert!(!f.ready_out_of_service(false));
    }
}
