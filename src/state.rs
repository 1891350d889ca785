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

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::check::{Cause, Details};
use crate::config::{Config, DependencyConfig, Impact, SlowStart};
use crate::fleet::ramp;

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
    /// Bits of the dependencies of the config in force.
    active: u64,
    /// Bits given to the dependencies of a reload not yet committed
    /// ([`Health::prepare`]); they count for nothing until [`Health::commit`].
    pending: u64,
    /// Bit i: dependency i came back up and is in its slow-start window.
    ramping: u64,
}

impl Facts {
    /// The request-path mask: overrides win over checks; maintenance sets its bit.
    fn not_up(&self) -> u64 {
        let maintenance = if self.mode == Mode::Maintenance { MAINTENANCE_BIT } else { 0 };
        (self.checked_not_up & !self.forced_up) | self.forced_down | maintenance
    }

    /// A forced dependency has a verdict, whether or not it was checked yet;
    /// a dependency of a reload not yet in force does not hold the start back.
    fn unknown(&self) -> u64 {
        self.checked_unknown & self.active & !(self.forced_up | self.forced_down)
    }

    /// The ramps in force: an operator's forced "up" admits everything.
    fn ramping(&self) -> u64 {
        self.ramping & !self.forced_up
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
    /// Its bit in the request-path masks, fixed for the dependency's life
    /// across reloads (the config index is not: a reload may reorder).
    pub bit: usize,
    /// Name.
    pub name: String,
    /// `type` label.
    pub kind: &'static str,
    /// Impact.
    pub impact: Impact,
    /// Its slow start, if configured.
    slow_start: Option<SlowStart>,
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
    /// The dependencies of the config in force, in config order; swapped whole by a reload.
    deps: ArcSwap<Vec<Arc<DepSlot>>>,
    /// What the masks are computed from; held only while writing them.
    facts: Mutex<Facts>,
    /// Bit i set = dependency i is not up (down or unknown), overrides
    /// applied; [`MAINTENANCE_BIT`] set in maintenance.
    not_up: AtomicU64,
    /// What the request path loads: `not_up` plus the ramping dependencies,
    /// so that a request needing none of them is admitted after one load.
    gate_mask: AtomicU64,
    /// Bit i set = dependency i has no verdict yet.
    unknown: AtomicU64,
    /// Bits of the `out_of_service` dependencies (changed only by a reload).
    oos_mask: AtomicU64,
    /// Bits of the `degraded` dependencies (changed only by a reload).
    degraded_mask: AtomicU64,
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
    /// Bit i set = the dependency with bit i came back up and is still in
    /// its slow-start window: the request path admits only a share of what
    /// needs it. Written with the other masks, under the facts lock.
    ramping: AtomicU64,
    /// Per bit: when that dependency's ramp began, in ms since `clock`.
    ramp_began_ms: Vec<AtomicU64>,
    /// The base of `ramp_began_ms`.
    clock: std::time::Instant,
    /// The slots of a reload between [`Health::prepare`] and [`Health::commit`].
    staged: Mutex<Vec<Arc<DepSlot>>>,
}

impl DepSlot {
    /// A slot for dependency `d` at `bit`, publishing into `tx`.
    fn new(bit: usize, d: &DependencyConfig, tx: watch::Sender<DepStatus>) -> DepSlot {
        DepSlot { bit, name: d.name.clone(), kind: d.kind.type_name(), impact: d.impact, slow_start: d.slow_start, tx }
    }
}

/// How a reload keeps a dependency's slot ([`Health::prepare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Same settings: the same slot, verdict, counters and check.
    Same,
    /// Changed settings: the same bit and verdict; the rise/fall counts start
    /// over for the new check.
    Restart,
    /// Not in the old config: a new bit, no verdict yet.
    New,
}

/// Why a reload cannot lay out its dependencies.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Old and new dependencies together need more bits than the masks have
    /// (a removed dependency's bit is only free once the reload is in force).
    #[error(
        "the old and the new config together have more than {} distinct dependencies; reload in two steps or restart",
        crate::config::MAX_DEPENDENCIES
    )]
    NoFreeBit,
}

/// The bits of the `out_of_service` and of the `degraded` dependencies of one config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Classes {
    /// Bits of the `out_of_service` dependencies.
    pub oos: u64,
    /// Bits of the `degraded` dependencies.
    pub degraded: u64,
}

impl Classes {
    /// The classes of `config`'s dependencies, `bits[i]` being the bit of dependency `i`.
    pub fn of(config: &Config, bits: &[usize]) -> Classes {
        let mask = |impact| {
            config.dependencies.iter().zip(bits).filter(|(d, _)| d.impact == impact).fold(0u64, |m, (_, b)| m | 1 << b)
        };
        Classes { oos: mask(Impact::OutOfService), degraded: mask(Impact::Degraded) }
    }
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
            .enumerate()
            .map(|(bit, d)| Arc::new(DepSlot::new(bit, d, watch::Sender::new(DepStatus::unknown()))))
            .collect();
        let initial = if n == 0 { ServiceState::InService } else { ServiceState::Starting };
        let facts = Facts {
            checked_not_up: low_bits(n),
            checked_unknown: low_bits(n),
            forced_up: 0,
            forced_down: 0,
            mode: Mode::Normal,
            active: low_bits(n),
            pending: 0,
            ramping: 0,
        };
        Arc::new(Health {
            deps: ArcSwap::from_pointee(deps),
            facts: Mutex::new(facts),
            not_up: AtomicU64::new(low_bits(n)),
            gate_mask: AtomicU64::new(low_bits(n)),
            unknown: AtomicU64::new(low_bits(n)),
            oos_mask: AtomicU64::new(mask_of(Impact::OutOfService)),
            degraded_mask: AtomicU64::new(mask_of(Impact::Degraded)),
            draining: AtomicBool::new(false),
            drain_began: OnceLock::new(),
            changed: Notify::new(),
            epoch: watch::Sender::new(0),
            service: watch::Sender::new((initial, SystemTime::now())),
            started: SystemTime::now(),
            staged: Mutex::new(Vec::new()),
            ramping: AtomicU64::new(0),
            ramp_began_ms: (0..64).map(|_| AtomicU64::new(0)).collect(),
            clock: std::time::Instant::now(),
        })
    }

    /// First step of a reload: the slots of `config`'s dependencies, in its
    /// order. `keep[i]` says how dependency `i` relates to the config in
    /// force (matched by name). A kept dependency keeps its bit, so masks
    /// built for the old config stay valid for requests still using it; a new
    /// one gets a bit no dependency in force uses, and counts for nothing
    /// (not in the start, the service state or any route) until [`Health::commit`].
    pub fn prepare(&self, config: &Config, keep: &[Keep]) -> Result<Vec<Arc<DepSlot>>, LayoutError> {
        let current = self.deps.load_full();
        let mut facts = self.facts();
        let mut taken = facts.active | facts.pending | MAINTENANCE_BIT;
        let mut slots = Vec::with_capacity(config.dependencies.len());
        let mut fresh = 0u64;
        for (d, k) in config.dependencies.iter().zip(keep) {
            let old = current.iter().find(|o| o.name == d.name);
            let slot = match (k, old) {
                (Keep::Same, Some(o)) if o.impact == d.impact => o.clone(),
                (Keep::Same | Keep::Restart, Some(o)) => {
                    if *k == Keep::Restart {
                        o.tx.send_modify(|s| {
                            s.consecutive_successes = 0;
                            s.consecutive_failures = 0;
                        });
                    }
                    Arc::new(DepSlot::new(o.bit, d, o.tx.clone()))
                }
                _ => {
                    let bit = (!taken).trailing_zeros() as usize;
                    if bit >= crate::config::MAX_DEPENDENCIES {
                        facts.pending = 0;
                        return Err(LayoutError::NoFreeBit);
                    }
                    taken |= 1 << bit;
                    fresh |= 1 << bit;
                    Arc::new(DepSlot::new(bit, d, watch::Sender::new(DepStatus::unknown())))
                }
            };
            slots.push(slot);
        }
        // A fresh bit starts with no verdict and no override, whatever a
        // dependency that held it before left there.
        facts.pending = fresh;
        facts.checked_not_up |= fresh;
        facts.checked_unknown |= fresh;
        facts.forced_up &= !fresh;
        facts.forced_down &= !fresh;
        facts.ramping &= !fresh;
        self.not_up.store(facts.not_up(), Ordering::Relaxed);
        self.unknown.store(facts.unknown(), Ordering::Relaxed);
        drop(facts);
        *self.staged.lock().unwrap_or_else(|e| e.into_inner()) = slots.clone();
        Ok(slots)
    }

    /// Last step of a reload: `slots` (from [`Health::prepare`]) are the
    /// dependencies in force. The bits of removed dependencies are cleared
    /// (verdict and override): a request still under the old config that
    /// needs one is no longer refused for it, and a later reload may reuse it.
    pub fn commit(&self, slots: Vec<Arc<DepSlot>>) {
        let bits = |f: &dyn Fn(&DepSlot) -> bool| slots.iter().filter(|d| f(d)).fold(0u64, |m, d| m | 1 << d.bit);
        let active = bits(&|_| true);
        let oos = bits(&|d| d.impact == Impact::OutOfService);
        let degraded = bits(&|d| d.impact == Impact::Degraded);
        let mut facts = self.facts();
        let removed = facts.active & !active;
        facts.active = active;
        facts.pending = 0;
        facts.checked_not_up &= !removed;
        facts.checked_unknown &= !removed;
        facts.forced_up &= !removed;
        facts.forced_down &= !removed;
        facts.ramping &= !removed;
        self.oos_mask.store(oos, Ordering::Relaxed);
        self.degraded_mask.store(degraded, Ordering::Relaxed);
        self.deps.store(Arc::new(slots));
        self.not_up.store(facts.not_up(), Ordering::Relaxed);
        self.unknown.store(facts.unknown(), Ordering::Relaxed);
        drop(facts);
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.touch();
    }

    /// Drops a prepared reload that will not be committed.
    pub fn abandon(&self) {
        let mut facts = self.facts();
        facts.pending = 0;
        drop(facts);
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The dependency slots of the config in force, in config order (a
    /// snapshot: a reload swaps the list, never changes it in place).
    pub fn deps(&self) -> Arc<Vec<Arc<DepSlot>>> {
        self.deps.load_full()
    }

    /// The slot of the dependency with this bit, if it is in force.
    pub fn slot(&self, bit: usize) -> Option<Arc<DepSlot>> {
        self.deps.load().iter().find(|d| d.bit == bit).cloned()
    }

    /// The request-path decision for a request needing the dependencies in `needs`.
    ///
    /// One relaxed atomic load when everything is up; no lock, no
    /// allocation. While a needed dependency ramps up after an outage
    /// (`slow_start`), only its current share of requests is admitted and the
    /// rest are rejected as if it were still down.
    #[inline]
    pub fn admission(&self, needs: u64) -> Admission {
        self.admission_in(needs, self.classes())
    }

    /// The decision from the verdicts alone, without the slow-start draw:
    /// for decisions about the pod (closing connections, `/status`), not
    /// about one request.
    pub fn gate(&self, needs: u64) -> Admission {
        self.gate_in(needs, self.classes())
    }

    /// [`Health::gate`] with the impact classes of the config a connection
    /// runs under (see [`Health::admission_in`]).
    pub fn gate_in(&self, needs: u64, classes: Classes) -> Admission {
        let missing = self.not_up.load(Ordering::Relaxed) & needs;
        if missing == 0 { Admission::Admit } else { Admission::Reject(self.classify_in(missing, classes), missing) }
    }

    /// Admission while some needed dependency ramps: the lowest share among
    /// them decides, by one draw of this thread's admission sequence.
    #[cold]
    fn ramp_admission(&self, needs: u64, classes: Classes) -> Admission {
        let mut bits = self.ramping.load(Ordering::Acquire) & needs;
        let now = self.clock.elapsed();
        let (mut share, mut limiting) = (1.0f64, 0u64);
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(s) = self.ramp_share_at(i, now)
                && s < share
            {
                (share, limiting) = (s, 1 << i);
            }
        }
        if ramp::admit(share) {
            Admission::Admit
        } else {
            Admission::Reject(self.classify_in(limiting, classes), limiting)
        }
    }

    /// The admitted share at `now` (since `clock`) of the dependency with
    /// bit `index`, if it has a slow start.
    fn ramp_share_at(&self, index: usize, now: Duration) -> Option<f64> {
        let r = self.slot(index)?.slow_start?;
        let began = Duration::from_millis(self.ramp_began_ms[index].load(Ordering::Relaxed));
        Some(ramp::share(now.saturating_sub(began), r.window, r.floor))
    }

    /// The share of requests needing dependency `index` that are admitted
    /// now: 0 while it is not up, its ramp's share while it ramps, else 1.
    pub fn admitted_share(&self, index: usize) -> f64 {
        let bit = 1u64 << index;
        if self.not_up.load(Ordering::Relaxed) & bit != 0 {
            0.0
        } else if self.ramping.load(Ordering::Acquire) & bit != 0 {
            self.ramp_share_at(index, self.clock.elapsed()).unwrap_or(1.0)
        } else {
            1.0
        }
    }

    /// Whether dependency `index` is in its slow-start window.
    pub fn ramping(&self, index: usize) -> bool {
        // The ramp itself, even while an operator's forced "up" suspends it:
        // its monitor must still end it.
        self.facts().ramping & (1 << index) != 0
    }

    /// Ends dependency `index`'s ramp once its window is over (called by
    /// its monitor, so the request path never writes the mask).
    pub fn end_ramp(&self, index: usize) {
        self.update(|f| f.ramping &= !(1u64 << index));
    }

    /// [`Health::admission`] with the impact classes of the config the
    /// request runs under (its listener context), so that a reload that
    /// changes or removes a dependency never answers a request of the old
    /// config with the new config's class.
    #[inline]
    pub fn admission_in(&self, needs: u64, classes: Classes) -> Admission {
        if self.gate_mask.load(Ordering::Relaxed) & needs == 0 {
            return Admission::Admit;
        }
        let missing = self.not_up.load(Ordering::Relaxed) & needs;
        if missing != 0 {
            return Admission::Reject(self.classify_in(missing, classes), missing);
        }
        self.ramp_admission(needs, classes)
    }

    /// The impact classes of the config in force.
    pub fn classes(&self) -> Classes {
        Classes { oos: self.oos_mask.load(Ordering::Relaxed), degraded: self.degraded_mask.load(Ordering::Relaxed) }
    }

    #[cold]
    fn classify_in(&self, missing: u64, classes: Classes) -> Reject {
        if missing & MAINTENANCE_BIT != 0 {
            Reject::Maintenance
        } else if missing & (classes.oos | self.unknown.load(Ordering::Relaxed)) != 0 {
            Reject::OutOfService
        } else if missing & classes.degraded != 0 {
            Reject::Degraded
        } else {
            // Only `observe` dependencies are missing: they never gate. A
            // caller's `needs` normally excludes them; be safe anyway.
            Reject::Degraded
        }
    }

    /// Whether a set of missing dependencies should gate at all (ignores `observe`).
    pub fn gating_mask(&self) -> u64 {
        self.oos_mask.load(Ordering::Relaxed) | self.degraded_mask.load(Ordering::Relaxed)
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
        // Release: a reader that sees a ramp's bit also sees when it began.
        self.ramping.store(facts.ramping(), Ordering::Release);
        self.gate_mask.store(facts.not_up() | facts.ramping(), Ordering::Release);
    }

    /// Publishes the status of the dependency with bit `index` ([`DepSlot::bit`]);
    /// called only by that dependency's monitor.
    pub fn publish(&self, index: usize, status: DepStatus) {
        if let Some(slot) = self.slot(index).or_else(|| self.pending_slot(index)) {
            self.publish_to(&slot, status);
        }
    }

    /// A slot of a reload not yet committed (its monitor already runs).
    fn pending_slot(&self, bit: usize) -> Option<Arc<DepSlot>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|d| d.bit == bit).cloned()
    }

    /// Publishes a dependency's status into its slot; called only by that
    /// dependency's monitor. The status of a dependency a reload removed
    /// (its monitor is being stopped) no longer touches the masks.
    ///
    /// A dependency with `slow_start` that comes back up (down → up, not the
    /// first verdict) starts its ramp here, in the same update that marks it
    /// up, so no request sees it up without the ramp.
    pub fn publish_to(&self, slot: &DepSlot, status: DepStatus) {
        let bit = 1u64 << slot.bit;
        let before = slot.tx.borrow().state;
        let ramp = status.state == DepHealth::Up && before == DepHealth::Down && slot.slow_start.is_some();
        if ramp {
            let now = self.clock.elapsed().as_millis() as u64;
            self.ramp_began_ms[slot.bit].store(now, Ordering::Relaxed);
        }
        self.update(|f| {
            if (f.active | f.pending) & bit == 0 {
                return;
            }
            match status.state {
                DepHealth::Up => {
                    f.checked_unknown &= !bit;
                    f.checked_not_up &= !bit;
                    if ramp {
                        f.ramping |= bit;
                    }
                }
                DepHealth::Down => {
                    f.checked_not_up |= bit;
                    f.checked_unknown &= !bit;
                    f.ramping &= !bit;
                }
                DepHealth::Unknown => {}
            }
        });
        let verdict_changed = before != status.state;
        slot.tx.send_replace(status);
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
        let checked = self.slot(index).map_or(DepHealth::Unknown, |d| d.tx.borrow().state);
        self.effective_of(index, checked)
    }

    /// The verdict gating uses for dependency `index` whose check said
    /// `checked`: callers holding a status snapshot pass its state, so that
    /// what they show together (state, since, counts) comes from one read.
    pub fn effective_of(&self, index: usize, checked: DepHealth) -> DepHealth {
        match self.force(index) {
            Some(Force::Up) => DepHealth::Up,
            Some(Force::Down) => DepHealth::Down,
            None => checked,
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
        } else if not_up & self.oos_mask.load(Ordering::Relaxed) != 0 {
            ServiceState::OutOfService
        } else if not_up & self.degraded_mask.load(Ordering::Relaxed) != 0 {
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

    /// Tells the watchers that readiness may have changed for a reason the
    /// verdicts do not show (the fleet's verdict on a dependency).
    pub fn readiness_inputs_changed(&self) {
        self.touch();
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

    /// Names of the dependencies in a mask, in config order, for opt-in problem details.
    pub fn names(&self, mask: u64) -> Vec<String> {
        self.deps.load().iter().filter(|d| mask & (1 << d.bit) != 0).map(|d| d.name.clone()).collect()
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

/// The mask of the dependencies at config `indices`, `bits[i]` being the bit of dependency `i`.
pub fn mask_of(bits: &[usize], indices: &[usize]) -> u64 {
    indices.iter().fold(0, |m, i| m | 1 << bits[*i])
}

/// [`Health::gate_mask`] with the bits of a layout: the request-path mask of a gated route.
pub fn gate_mask_of(bits: &[usize], indices: &[usize]) -> u64 {
    mask_of(bits, indices) | MAINTENANCE_BIT
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
    fn the_state_shown_with_a_snapshot_is_the_snapshots_after_a_later_publish() {
        let h = health(&[("db", "out_of_service")]);
        set(&h, 0, DepHealth::Up);
        let snapshot = h.deps()[0].status();
        set(&h, 0, DepHealth::Down);
        // What `/status` shows beside the snapshot's `since` and counts.
        assert_eq!(h.effective_of(0, snapshot.state), DepHealth::Up);
        assert_eq!(h.effective(0), DepHealth::Down);
        h.set_force(0, Some(Force::Down));
        assert_eq!(h.effective_of(0, snapshot.state), DepHealth::Down, "an override still decides");
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
        assert!(h.names(MAINTENANCE_BIT).is_empty());
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

    fn config(deps: &[(&str, &str)]) -> Config {
        let mut yaml = String::from(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n",
        );
        for (name, impact) in deps {
            yaml.push_str(&format!("  - name: {name}\n    type: tcp\n    address: x:1\n    impact: {impact}\n"));
        }
        Config::from_yaml(&yaml, Path::new("t")).unwrap()
    }

    #[test]
    fn a_reload_keeps_the_bits_and_verdicts_of_kept_dependencies_and_remaps_the_rest() {
        let h = health(&[("db", "out_of_service"), ("old", "out_of_service"), ("cache", "degraded")]);
        set(&h, 0, DepHealth::Up);
        set(&h, 1, DepHealth::Down);
        set(&h, 2, DepHealth::Up);
        let old_gate = Health::gate_mask(&[0, 1]);
        // New order: a new dependency first, `cache` changed to out_of_service, `old` removed.
        let next = config(&[("new", "out_of_service"), ("cache", "out_of_service"), ("db", "out_of_service")]);
        let slots = h.prepare(&next, &[Keep::New, Keep::Restart, Keep::Same]).unwrap();
        let bits: Vec<usize> = slots.iter().map(|s| s.bit).collect();
        assert_eq!(&bits[1..], [2, 0], "kept dependencies keep their bits");
        assert!(![0, 1, 2].contains(&bits[0]), "a new dependency takes no bit in force: {bits:?}");
        // Before the commit: the new one does not hold the service back.
        assert!(h.first_round_done());
        assert_eq!(h.admission(old_gate), Admission::Reject(Reject::OutOfService, 0b10));
        h.publish(bits[0], DepStatus { state: DepHealth::Up, ..DepStatus::unknown() });
        h.commit(slots);
        // A request still under the old config is not refused for the removed dependency.
        assert_eq!(h.admission(old_gate), Admission::Admit);
        let new_gate = gate_mask_of(&bits, &[0, 1, 2]);
        assert_eq!(h.admission(new_gate), Admission::Admit);
        assert_eq!(h.names(new_gate), ["new", "cache", "db"]);
        // `cache` is now out_of_service: its outage is a 503.
        set(&h, 2, DepHealth::Down);
        assert_eq!(h.admission(new_gate), Admission::Reject(Reject::OutOfService, 0b100));
        assert_eq!(h.compute_service_state(), ServiceState::OutOfService);
    }

    #[test]
    fn a_request_is_classified_with_the_impacts_of_its_own_config_across_a_reload() {
        let old = config(&[("db", "out_of_service")]);
        let h = Health::new(&old);
        set(&h, 0, DepHealth::Down);
        let old_classes = Classes::of(&old, &[0]);
        let new = config(&[("db", "degraded")]);
        let slots = h.prepare(&new, &[Keep::Restart]).unwrap();
        h.commit(slots);
        let gate = Health::gate_mask(&[0]);
        // A request that loaded the old context before the swap: 503, as the old config says.
        assert_eq!(h.admission_in(gate, old_classes), Admission::Reject(Reject::OutOfService, 1));
        // One under the new context: 500.
        assert_eq!(h.admission_in(gate, Classes::of(&new, &[0])), Admission::Reject(Reject::Degraded, 1));
        assert_eq!(h.admission(gate), Admission::Reject(Reject::Degraded, 1));
    }

    #[test]
    fn a_removed_dependency_leaves_no_verdict_or_override_for_the_next_holder_of_its_bit() {
        let h = health(&[("db", "out_of_service"), ("old", "out_of_service")]);
        set(&h, 0, DepHealth::Up);
        set(&h, 1, DepHealth::Up);
        h.set_force(1, Some(Force::Up));
        let one = config(&[("db", "out_of_service")]);
        let slots = h.prepare(&one, &[Keep::Same]).unwrap();
        h.commit(slots);
        // A monitor of the removed dependency that publishes late changes nothing.
        set(&h, 1, DepHealth::Down);
        assert_eq!(h.compute_service_state(), ServiceState::InService);
        let two = config(&[("db", "out_of_service"), ("fresh", "out_of_service")]);
        let slots = h.prepare(&two, &[Keep::Same, Keep::New]).unwrap();
        assert_eq!(slots[1].bit, 1, "a freed bit is reused by a later reload");
        h.commit(slots);
        assert_eq!(h.force(1), None);
        assert_eq!(h.effective(1), DepHealth::Unknown);
        assert_eq!(h.compute_service_state(), ServiceState::Starting);
    }

    #[test]
    fn a_reload_needing_more_bits_than_the_masks_have_is_refused_and_changes_nothing() {
        let names: Vec<String> = (0..crate::config::MAX_DEPENDENCIES).map(|i| format!("d{i}")).collect();
        let full: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "out_of_service")).collect();
        let h = health(&full);
        // One removed, one added: the removed bit is only free after the swap.
        let mut next = full[1..].to_vec();
        next.push(("new", "out_of_service"));
        let mut keep = vec![Keep::Same; next.len() - 1];
        keep.push(Keep::New);
        assert!(matches!(h.prepare(&config(&next), &keep), Err(LayoutError::NoFreeBit)));
        assert_eq!(h.deps().len(), crate::config::MAX_DEPENDENCIES);
        assert_eq!(h.names(1).as_slice(), ["d0"]);
    }

    #[test]
    fn a_dependency_back_up_admits_only_its_slow_start_share_until_the_ramp_ends() {
        let yaml = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\ndependencies:\n  - name: db\n    type: tcp\n    address: x:1\n    slow_start:\n      window: 1h\n      floor: 0.25\n";
        let h = Health::new(&Config::from_yaml(yaml, Path::new("t")).unwrap());
        // The first verdict is no recovery: no ramp.
        set(&h, 0, DepHealth::Up);
        assert!(!h.ramping(0));
        assert_eq!(h.admitted_share(0), 1.0);
        set(&h, 0, DepHealth::Down);
        assert_eq!(h.admitted_share(0), 0.0);
        set(&h, 0, DepHealth::Up);
        assert!(h.ramping(0));
        let admitted = (0..1000).filter(|_| h.admission(0b1) == Admission::Admit).count();
        assert!((240..=260).contains(&admitted), "{admitted} of 1000 admitted at a 25 % floor");
        // A refused request gets the dependency's usual short-circuit class.
        assert!((0..10).any(|_| h.admission(0b1) == Admission::Reject(Reject::OutOfService, 0b1)));
        // Decisions about the pod ignore the draw.
        assert_eq!(h.gate(0b1), Admission::Admit);
        assert_eq!(h.admission(0b10), Admission::Admit);
        h.end_ramp(0);
        assert!((0..100).all(|_| h.admission(0b1) == Admission::Admit));
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
