//! The shared health state.
//!
//! Two views of the same facts, for two kinds of reader:
//! * the request path reads two `AtomicU64` bit masks (bit *i* = dependency
//!   *i*): one load, no lock, no allocation per request ([`Health::admission`]);
//! * the admin server and the aggregator read each dependency's full
//!   [`DepStatus`] from its `watch` channel.
//!
//! Each dependency has exactly one writer of its checked verdict, its monitor
//! task. The operator's overrides (a forced verdict, maintenance) are folded
//! into the same masks when they change, so the request path pays nothing
//! for them: the masks are recomputed by the (rare) writers under a small
//! lock, and the request path still does one relaxed load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::check::{Cause, Details};
use crate::config::{Config, Impact};

/// A dependency's health verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DepHealth {
    /// No verdict yet (never assumed healthy).
    Unknown,
    /// Passing (after `rise` successes).
    Up,
    /// Failing (after `fall` failures).
    Down,
}

/// Everything known about one dependency, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct DepStatus {
    /// Current verdict.
    pub state: DepHealth,
    /// When the verdict last changed (or monitoring started).
    #[serde(with = "rfc3339")]
    pub since: SystemTime,
    /// When the last check finished.
    #[serde(with = "rfc3339_opt")]
    pub last_check: Option<SystemTime>,
    /// How long the last check took, in seconds.
    pub last_latency_seconds: Option<f64>,
    /// Whether the last check passed.
    pub last_ok: Option<bool>,
    /// Cause of the most recent failure.
    pub last_cause: Option<Cause>,
    /// Message of the most recent failure (never contains secrets).
    pub last_message: Option<String>,
    /// Consecutive passing checks.
    pub consecutive_successes: u32,
    /// Consecutive failing checks.
    pub consecutive_failures: u32,
    /// Checks run so far.
    pub checks_total: u64,
    /// Protocol-specific facts.
    pub details: Details,
    /// The most recent check results, for the status page's sparkline.
    #[serde(skip)]
    pub history: History,
}

/// How many check results [`History`] keeps.
pub const HISTORY_LEN: usize = 40;

/// The last [`HISTORY_LEN`] check results (pass/fail and latency) in a fixed
/// ring: bounded memory, and copying it allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct History {
    ok: u64,
    latency_ms: [f32; HISTORY_LEN],
    len: u8,
    next: u8,
}

impl Default for History {
    fn default() -> Self {
        History { ok: 0, latency_ms: [0.0; HISTORY_LEN], len: 0, next: 0 }
    }
}

impl History {
    /// Records one check result, dropping the oldest when full.
    pub fn push(&mut self, ok: bool, latency: Duration) {
        let i = self.next as usize;
        self.latency_ms[i] = latency.as_secs_f32() * 1000.0;
        if ok {
            self.ok |= 1 << i;
        } else {
            self.ok &= !(1 << i);
        }
        self.next = ((i + 1) % HISTORY_LEN) as u8;
        self.len = (self.len + 1).min(HISTORY_LEN as u8);
    }

    /// The results, oldest first: (passed, latency in milliseconds).
    pub fn iter(&self) -> impl Iterator<Item = (bool, f32)> + '_ {
        let start = (self.next as usize + HISTORY_LEN - self.len as usize) % HISTORY_LEN;
        (0..self.len as usize).map(move |k| {
            let i = (start + k) % HISTORY_LEN;
            (self.ok & (1 << i) != 0, self.latency_ms[i])
        })
    }

    /// How many results it holds.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl DepStatus {
    /// The status of a dependency that has no verdict yet.
    pub fn unknown() -> Self {
        DepStatus {
            state: DepHealth::Unknown,
            since: SystemTime::now(),
            last_check: None,
            last_latency_seconds: None,
            last_ok: None,
            last_cause: None,
            last_message: None,
            consecutive_successes: 0,
            consecutive_failures: 0,
            checks_total: 0,
            details: Details::default(),
            history: History::default(),
        }
    }
}

/// The service state, derived from the dependencies and the lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Some dependency has no verdict yet.
    Starting,
    /// Every dependency is up.
    InService,
    /// A `degraded` dependency is down.
    Degraded,
    /// An `out_of_service` dependency is down.
    OutOfService,
    /// SIGTERM received, or an operator drain: readiness fails, traffic still flows.
    Draining,
    /// An operator put the pod in maintenance: readiness fails and gated
    /// requests are answered 503.
    Maintenance,
}

impl ServiceState {
    /// Every state, for the `service_state` gauge.
    pub const ALL: [ServiceState; 6] = [
        ServiceState::Starting,
        ServiceState::InService,
        ServiceState::Degraded,
        ServiceState::OutOfService,
        ServiceState::Draining,
        ServiceState::Maintenance,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Starting => "starting",
            ServiceState::InService => "in_service",
            ServiceState::Degraded => "degraded",
            ServiceState::OutOfService => "out_of_service",
            ServiceState::Draining => "draining",
            ServiceState::Maintenance => "maintenance",
        }
    }
}

/// The class of a short-circuited request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 503: a needed `out_of_service` dependency is down, or a needed one has no verdict yet.
    OutOfService,
    /// 500: a needed `degraded` dependency is down.
    Degraded,
    /// 503 with the maintenance body: an operator put the pod in maintenance.
    Maintenance,
}

/// The bit of the request-path mask that is set while the pod is in
/// maintenance; every gated route's mask includes it ([`Health::gate_mask`]).
pub const MAINTENANCE_BIT: u64 = 1 << 63;

/// The operator's mode for the whole pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// No operator action.
    Normal,
    /// Readiness fails; traffic is still proxied (leave the Service gracefully).
    Drain,
    /// Readiness fails and gated requests are answered 503.
    Maintenance,
}

/// A verdict an operator forces on a dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Force {
    /// Treated as up whatever the check says.
    Up,
    /// Treated as down whatever the check says.
    Down,
}

/// The facts the request-path masks are derived from; only writers touch them.
#[derive(Debug, Clone, Copy)]
struct Facts {
    /// Bit i: the check of dependency i says it is not up.
    checked_not_up: u64,
    /// Bit i: dependency i has no checked verdict yet.
    checked_unknown: u64,
    forced_up: u64,
    forced_down: u64,
    mode: Mode,
}

impl Facts {
    /// The request-path mask: overrides win over checks; maintenance sets its bit.
    fn not_up(&self) -> u64 {
        let maintenance = if self.mode == Mode::Maintenance { MAINTENANCE_BIT } else { 0 };
        (self.checked_not_up & !self.forced_up) | self.forced_down | maintenance
    }

    /// A forced dependency has a verdict, whether or not it was checked yet.
    fn unknown(&self) -> u64 {
        self.checked_unknown & !(self.forced_up | self.forced_down)
    }
}

/// The admission decision for a request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Forward it.
    Admit,
    /// Answer it ourselves; the mask names the needed dependencies that are not up.
    Reject(Reject, u64),
}

/// One dependency's slot.
pub struct DepSlot {
    /// Name.
    pub name: String,
    /// `type` label.
    pub kind: &'static str,
    /// Impact.
    pub impact: Impact,
    /// Full status (the monitor holds the only `Sender`... through `publish`).
    tx: watch::Sender<DepStatus>,
}

impl DepSlot {
    /// Subscribes to this dependency's status.
    pub fn subscribe(&self) -> watch::Receiver<DepStatus> {
        self.tx.subscribe()
    }

    /// A copy of the current status.
    pub fn status(&self) -> DepStatus {
        self.tx.borrow().clone()
    }
}

/// The shared health state of the process.
pub struct Health {
    deps: Vec<DepSlot>,
    /// What the masks are computed from; held only while writing them.
    facts: Mutex<Facts>,
    /// Bit i set = dependency i is not up (down or unknown), overrides
    /// applied; [`MAINTENANCE_BIT`] set in maintenance.
    not_up: AtomicU64,
    /// Bit i set = dependency i has no verdict yet.
    unknown: AtomicU64,
    /// Bits of the `out_of_service` dependencies.
    oos_mask: u64,
    /// Bits of the `degraded` dependencies.
    degraded_mask: u64,
    draining: AtomicBool,
    /// When draining began (set once, with `draining`).
    drain_began: OnceLock<Instant>,
    /// Woken on every change of a dependency's verdict or of the lifecycle.
    changed: Notify,
    /// Bumped on the same changes and on every new service state, for any
    /// number of watchers (the gRPC health `Watch` streams); `changed` has
    /// one waiter, the aggregator.
    epoch: watch::Sender<u64>,
    service: watch::Sender<(ServiceState, SystemTime)>,
    started: SystemTime,
}

/// The mask with the first `n` bits set.
fn low_bits(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

impl Health {
    /// Builds the state for a config: every dependency starts `Unknown`.
    pub fn new(config: &Config) -> Arc<Health> {
        let n = config.dependencies.len();
        let mask_of = |impact| {
            config
                .dependencies
                .iter()
                .enumerate()
                .filter(|(_, d)| d.impact == impact)
                .fold(0u64, |m, (i, _)| m | 1 << i)
        };
        let deps = config
            .dependencies
            .iter()
            .map(|d| DepSlot {
                name: d.name.clone(),
                kind: d.kind.type_name(),
                impact: d.impact,
                tx: watch::Sender::new(DepStatus::unknown()),
            })
            .collect();
        let initial = if n == 0 { ServiceState::InService } else { ServiceState::Starting };
        let facts = Facts {
            checked_not_up: low_bits(n),
            checked_unknown: low_bits(n),
            forced_up: 0,
            forced_down: 0,
            mode: Mode::Normal,
        };
        Arc::new(Health {
            deps,
            facts: Mutex::new(facts),
            not_up: AtomicU64::new(low_bits(n)),
            unknown: AtomicU64::new(low_bits(n)),
            oos_mask: mask_of(Impact::OutOfService),
            degraded_mask: mask_of(Impact::Degraded),
            draining: AtomicBool::new(false),
            drain_began: OnceLock::new(),
            changed: Notify::new(),
            epoch: watch::Sender::new(0),
            service: watch::Sender::new((initial, SystemTime::now())),
            started: SystemTime::now(),
        })
    }

    /// The dependency slots, in config order.
    pub fn deps(&self) -> &[DepSlot] {
        &self.deps
    }

    /// The request-path decision for a request needing the dependencies in `needs`.
    ///
    /// One relaxed atomic load when everything is up; no lock, no allocation.
    #[inline]
    pub fn admission(&self, needs: u64) -> Admission {
        let missing = self.not_up.load(Ordering::Relaxed) & needs;
        if missing == 0 {
            return Admission::Admit;
        }
        Admission::Reject(self.classify(missing), missing)
    }

    /// The class of a rejection for a non-empty set of missing dependencies.
    #[cold]
    fn classify(&self, missing: u64) -> Reject {
        if missing & MAINTENANCE_BIT != 0 {
            Reject::Maintenance
        } else if missing & (self.oos_mask | self.unknown.load(Ordering::Relaxed)) != 0 {
            Reject::OutOfService
        } else if missing & self.degraded_mask != 0 {
            Reject::Degraded
        } else {
            // Only `observe` dependencies are missing: they never gate. A
            // caller's `needs` normally excludes them; be safe anyway.
            Reject::Degraded
        }
    }

    /// Whether a set of missing dependencies should gate at all (ignores `observe`).
    pub fn gating_mask(&self) -> u64 {
        self.oos_mask | self.degraded_mask
    }

    /// Locks the facts (a poisoned lock still holds valid bit masks).
    fn facts(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the facts and republishes both masks while still holding the
    /// lock, so two writers cannot interleave a stale mask.
    fn update(&self, f: impl FnOnce(&mut Facts)) {
        let mut facts = self.facts();
        f(&mut facts);
        self.not_up.store(facts.not_up(), Ordering::Relaxed);
        self.unknown.store(facts.unknown(), Ordering::Relaxed);
    }

    /// Publishes a dependency's status; called only by that dependency's monitor.
    pub fn publish(&self, index: usize, status: DepStatus) {
        let bit = 1u64 << index;
        match status.state {
            DepHealth::Up => self.update(|f| {
                f.checked_unknown &= !bit;
                f.checked_not_up &= !bit;
            }),
            DepHealth::Down => self.update(|f| {
                f.checked_not_up |= bit;
                f.checked_unknown &= !bit;
            }),
            DepHealth::Unknown => {}
        }
        let verdict_changed = self.deps[index].tx.borrow().state != status.state;
        self.deps[index].tx.send_replace(status);
        if verdict_changed {
            self.touch();
        }
    }

    /// Forces dependency `index` up or down (`None`: its check decides again).
    pub fn set_force(&self, index: usize, force: Option<Force>) {
        let bit = 1u64 << index;
        self.update(|f| {
            f.forced_up &= !bit;
            f.forced_down &= !bit;
            match force {
                Some(Force::Up) => f.forced_up |= bit,
                Some(Force::Down) => f.forced_down |= bit,
                None => {}
            }
        });
        self.touch();
    }

    /// The verdict forced on dependency `index`, if any.
    pub fn force(&self, index: usize) -> Option<Force> {
        let f = self.facts();
        let bit = 1u64 << index;
        if f.forced_up & bit != 0 {
            Some(Force::Up)
        } else if f.forced_down & bit != 0 {
            Some(Force::Down)
        } else {
            None
        }
    }

    /// The verdict gating uses for dependency `index`: the forced one, else the checked one.
    pub fn effective(&self, index: usize) -> DepHealth {
        match self.force(index) {
            Some(Force::Up) => DepHealth::Up,
            Some(Force::Down) => DepHealth::Down,
            None => self.deps[index].tx.borrow().state,
        }
    }

    /// Sets the operator's mode for the pod.
    pub fn set_mode(&self, mode: Mode) {
        self.update(|f| f.mode = mode);
        self.touch();
    }

    /// The operator's mode for the pod.
    pub fn mode(&self) -> Mode {
        self.facts().mode
    }

    /// Enters draining (SIGTERM): readiness fails from now on.
    pub fn start_draining(&self) {
        let _ = self.drain_began.set(Instant::now());
        self.draining.store(true, Ordering::SeqCst);
        self.touch();
    }

    /// Whether SIGTERM was received.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// When draining began (SIGTERM), if it did.
    pub fn draining_since(&self) -> Option<Instant> {
        self.drain_began.get().copied()
    }

    /// Whether every dependency has had a first verdict (the startup probe).
    pub fn first_round_done(&self) -> bool {
        self.unknown.load(Ordering::Relaxed) == 0
    }

    /// Computes the service state from the current facts.
    pub fn compute_service_state(&self) -> ServiceState {
        if self.is_draining() {
            return ServiceState::Draining;
        }
        match self.mode() {
            Mode::Maintenance => return ServiceState::Maintenance,
            Mode::Drain => return ServiceState::Draining,
            Mode::Normal => {}
        }
        let not_up = self.not_up.load(Ordering::Relaxed);
        let unknown = self.unknown.load(Ordering::Relaxed);
        if unknown != 0 {
            ServiceState::Starting
        } else if not_up & self.oos_mask != 0 {
            ServiceState::OutOfService
        } else if not_up & self.degraded_mask != 0 {
            ServiceState::Degraded
        } else {
            ServiceState::InService
        }
    }

    /// Wakes the aggregator and every watcher of [`Health::subscribe_changes`].
    fn touch(&self) {
        self.changed.notify_one();
        self.epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// A receiver that sees a new value whenever a verdict, an override, the
    /// lifecycle or the service state changed: cheap to hold, any number of them.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Waits until something changed that may change the service state.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Records a new service state (called by the aggregator only).
    pub fn set_service_state(&self, state: ServiceState) -> bool {
        let modified = self.service.send_if_modified(|(s, since)| {
            if *s == state {
                false
            } else {
                *s = state;
                *since = SystemTime::now();
                true
            }
        });
        if modified {
            self.epoch.send_modify(|e| *e = e.wrapping_add(1));
        }
        modified
    }

    /// The current service state and since when.
    pub fn service_state(&self) -> (ServiceState, SystemTime) {
        *self.service.borrow()
    }

    /// Subscribes to service state changes.
    pub fn subscribe_service(&self) -> watch::Receiver<(ServiceState, SystemTime)> {
        self.service.subscribe()
    }

    /// Process start time.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// Names of the dependencies in a mask, for opt-in problem details.
    pub fn names(&self, mask: u64) -> impl Iterator<Item = &str> {
        self.deps.iter().enumerate().filter(move |(i, _)| mask & (1 << i) != 0).map(|(_, d)| d.name.as_str())
    }

    /// The bit mask of a list of dependency indices.
    pub fn mask(indices: &[usize]) -> u64 {
        indices.iter().fold(0, |m, i| m | 1 << i)
    }

    /// The request-path mask of a gated route needing these dependencies:
    /// their bits plus [`MAINTENANCE_BIT`], so maintenance rejects it with
    /// the same single load.
    pub fn gate_mask(indices: &[usize]) -> u64 {
        Self::mask(indices) | MAINTENANCE_BIT
    }
}

/// Uptime helper for `/status`.
pub fn age(since: SystemTime) -> Duration {
    SystemTime::now().duration_since(since).unwrap_or_default()
}

/// Serde helpers: timestamps as RFC 3339 strings.
mod rfc3339 {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
    }
}

mod rfc3339_opt {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::rfc3339::serialize(t, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn health(deps: &[(&str, &str)]) -> Arc<Health> {
        let mut yaml = String::from(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n",
        );
        for (name, impact) in deps {
            yaml.push_str(&format!("  - name: {name}\n    type: tcp\n    address: x:1\n    impact: {impact}\n"));
        }
        Health::new(&Config::from_yaml(&yaml, Path::new("t")).unwrap())
    }

    fn set(h: &Health, i: usize, state: DepHealth) {
        h.publish(i, DepStatus { state, ..DepStatus::unknown() });
    }

    #[test]
    fn nothing_is_admitted_before_a_first_verdict() {
        let h = health(&[("db", "out_of_service"), ("cache", "degraded")]);
        assert_eq!(h.admission(0b11), Admission::Reject(Reject::OutOfService, 0b11));
        assert_eq!(h.compute_service_state(), ServiceState::Starting);
        // A degraded dependency without a verdict still means "starting": 503.
        set(&h, 0, DepHealth::Up);
        assert_eq!(h.admission(0b11), Admission::Reject(Reject::OutOfService, 0b10));
    }

    #[test]
    fn out_of_service_takes_precedence_over_degraded() {
        let h = health(&[("db", "out_of_service"), ("cache", "degraded")]);
        set(&h, 0, DepHealth::Down);
        set(&h, 1, DepHealth::Down);
        assert_eq!(h.admission(0b11), Admission::Reject(Reject::OutOfService, 0b11));
        assert_eq!(h.compute_service_state(), ServiceState::OutOfService);
        set(&h, 0, DepHealth::Up);
        assert_eq!(h.admission(0b11), Admission::Reject(Reject::Degraded, 0b10));
        assert_eq!(h.compute_service_state(), ServiceState::Degraded);
        set(&h, 1, DepHealth::Up);
        assert_eq!(h.admission(0b11), Admission::Admit);
        assert_eq!(h.compute_service_state(), ServiceState::InService);
    }

    #[test]
    fn a_request_needing_nothing_is_always_admitted() {
        let h = health(&[("db", "out_of_service")]);
        assert_eq!(h.admission(0), Admission::Admit);
    }

    #[test]
    fn draining_wins_over_every_other_state() {
        let h = health(&[("db", "out_of_service")]);
        set(&h, 0, DepHealth::Down);
        h.start_draining();
        assert_eq!(h.compute_service_state(), ServiceState::Draining);
    }

    #[test]
    fn a_forced_verdict_wins_over_the_check_until_cleared() {
        let h = health(&[("db", "out_of_service")]);
        set(&h, 0, DepHealth::Up);
        h.set_force(0, Some(Force::Down));
        assert_eq!(h.admission(0b1), Admission::Reject(Reject::OutOfService, 0b1));
        assert_eq!(h.compute_service_state(), ServiceState::OutOfService);
        // The check keeps publishing; the override still decides.
        set(&h, 0, DepHealth::Up);
        assert_eq!(h.effective(0), DepHealth::Down);
        assert_eq!(h.deps()[0].status().state, DepHealth::Up);
        h.set_force(0, None);
        assert_eq!(h.admission(0b1), Admission::Admit);
        set(&h, 0, DepHealth::Down);
        h.set_force(0, Some(Force::Up));
        assert_eq!(h.admission(0b1), Admission::Admit);
        assert_eq!(h.compute_service_state(), ServiceState::InService);
    }

    #[test]
    fn forcing_an_unchecked_dependency_up_ends_starting() {
        let h = health(&[("db", "out_of_service")]);
        h.set_force(0, Some(Force::Up));
        assert!(h.first_round_done());
        assert_eq!(h.admission(0b1), Admission::Admit);
    }

    #[test]
    fn maintenance_rejects_every_gated_route_and_drain_only_readiness() {
        let h = health(&[("db", "out_of_service")]);
        set(&h, 0, DepHealth::Up);
        let gated = Health::gate_mask(&[0]);
        let needs_nothing = Health::gate_mask(&[]);
        h.set_mode(Mode::Drain);
        assert_eq!(h.admission(gated), Admission::Admit);
        assert_eq!(h.compute_service_state(), ServiceState::Draining);
        h.set_mode(Mode::Maintenance);
        assert_eq!(h.admission(gated), Admission::Reject(Reject::Maintenance, MAINTENANCE_BIT));
        assert_eq!(h.admission(needs_nothing), Admission::Reject(Reject::Maintenance, MAINTENANCE_BIT));
        assert_eq!(h.compute_service_state(), ServiceState::Maintenance);
        assert_eq!(h.names(MAINTENANCE_BIT).count(), 0);
        h.set_mode(Mode::Normal);
        assert_eq!(h.admission(gated), Admission::Admit);
        assert_eq!(h.compute_service_state(), ServiceState::InService);
    }

    #[test]
    fn history_keeps_the_last_results_oldest_first() {
        let mut hist = History::default();
        for i in 0..(HISTORY_LEN + 3) {
            hist.push(i % 2 == 0, Duration::from_millis(i as u64));
        }
        let got: Vec<_> = hist.iter().collect();
        assert_eq!(got.len(), HISTORY_LEN);
        assert_eq!(got[0], (false, 3.0));
        assert_eq!(got[HISTORY_LEN - 1], (true, (HISTORY_LEN + 2) as f32));
    }

    #[test]
    fn watchers_see_every_change_of_a_verdict_override_mode_or_service_state() {
        let h = health(&[("db", "out_of_service")]);
        let mut rx = h.subscribe_changes();
        let mut changed = || {
            let c = rx.has_changed().unwrap();
            rx.borrow_and_update();
            c
        };
        assert!(!changed());
        set(&h, 0, DepHealth::Up);
        assert!(changed(), "a new verdict");
        set(&h, 0, DepHealth::Up);
        assert!(!changed(), "the same verdict again is no change");
        h.set_force(0, Some(Force::Down));
        assert!(changed(), "an override");
        h.set_mode(Mode::Maintenance);
        assert!(changed(), "a mode");
        assert!(h.set_service_state(ServiceState::Maintenance));
        assert!(changed(), "a service state");
        assert!(!h.set_service_state(ServiceState::Maintenance));
        assert!(!changed(), "the same service state again is no change");
        h.start_draining();
        assert!(changed(), "draining");
    }

    #[test]
    fn observe_dependencies_do_not_change_the_service_state() {
        let h = health(&[("db", "out_of_service"), ("audit", "observe")]);
        set(&h, 0, DepHealth::Up);
        set(&h, 1, DepHealth::Down);
        assert_eq!(h.compute_service_state(), ServiceState::InService);
    }
}
