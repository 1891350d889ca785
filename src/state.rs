//! The shared health state.
//!
//! Two views of the same facts, for two kinds of reader:
//! * the request path reads two `AtomicU64` bit masks (bit *i* = dependency
//!   *i*): one load, no lock, no allocation per request ([`Health::admission`]);
//! * the admin server and the aggregator read each dependency's full
//!   [`DepStatus`] from its `watch` channel.
//!
//! Each dependency has exactly one writer, its monitor task, which owns the
//! `watch::Sender` and flips only its own bits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{Notify, watch};

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
    /// SIGTERM received.
    Draining,
}

impl ServiceState {
    /// Every state, for the `service_state` gauge.
    pub const ALL: [ServiceState; 5] = [
        ServiceState::Starting,
        ServiceState::InService,
        ServiceState::Degraded,
        ServiceState::OutOfService,
        ServiceState::Draining,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Starting => "starting",
            ServiceState::InService => "in_service",
            ServiceState::Degraded => "degraded",
            ServiceState::OutOfService => "out_of_service",
            ServiceState::Draining => "draining",
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
    /// Bit i set = dependency i is not up (down or unknown).
    not_up: AtomicU64,
    /// Bit i set = dependency i has no verdict yet.
    unknown: AtomicU64,
    /// Bits of the `out_of_service` dependencies.
    oos_mask: u64,
    /// Bits of the `degraded` dependencies.
    degraded_mask: u64,
    draining: AtomicBool,
    /// Woken on every change of a dependency's verdict or of the lifecycle.
    changed: Notify,
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
        Arc::new(Health {
            deps,
            not_up: AtomicU64::new(low_bits(n)),
            unknown: AtomicU64::new(low_bits(n)),
            oos_mask: mask_of(Impact::OutOfService),
            degraded_mask: mask_of(Impact::Degraded),
            draining: AtomicBool::new(false),
            changed: Notify::new(),
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
        if missing & (self.oos_mask | self.unknown.load(Ordering::Relaxed)) != 0 {
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

    /// Publishes a dependency's status; called only by that dependency's monitor.
    pub fn publish(&self, index: usize, status: DepStatus) {
        let bit = 1u64 << index;
        match status.state {
            DepHealth::Up => {
                self.unknown.fetch_and(!bit, Ordering::Relaxed);
                self.not_up.fetch_and(!bit, Ordering::Relaxed);
            }
            DepHealth::Down => {
                self.not_up.fetch_or(bit, Ordering::Relaxed);
                self.unknown.fetch_and(!bit, Ordering::Relaxed);
            }
            DepHealth::Unknown => {}
        }
        let verdict_changed = self.deps[index].tx.borrow().state != status.state;
        self.deps[index].tx.send_replace(status);
        if verdict_changed {
            self.changed.notify_one();
        }
    }

    /// Enters draining (SIGTERM): readiness fails from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Whether SIGTERM was received.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
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

    /// Waits until something changed that may change the service state.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Records a new service state (called by the aggregator only).
    pub fn set_service_state(&self, state: ServiceState) -> bool {
        self.service.send_if_modified(|(s, since)| {
            if *s == state {
                false
            } else {
                *s = state;
                *since = SystemTime::now();
                true
            }
        })
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
    fn observe_dependencies_do_not_change_the_service_state() {
        let h = health(&[("db", "out_of_service"), ("audit", "observe")]);
        set(&h, 0, DepHealth::Up);
        set(&h, 1, DepHealth::Down);
        assert_eq!(h.compute_service_state(), ServiceState::InService);
    }
}
