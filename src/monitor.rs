//! The monitor loop: runs one dependency's check on its interval (with
//! jitter), bounds it by its timeout, applies rise/fall hysteresis, and
//! publishes the verdict. One task per dependency, the only writer of its
//! state. Also the aggregator, which turns verdicts into the service state
//! and emits the loud "OUT OF SERVICE" / "IN SERVICE" banners an operator greps for.
//!
//! Logging: one event per transition, never one per probe.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout_at};
use tracing::{debug, error, info, warn};

use crate::check::{AnyCheck, Cause, Check, CheckError};
use crate::config::DependencyConfig;
use crate::metrics::{DepLabels, DependencyLabels, Metrics, NodeLabels, TransitionLabels};
use crate::state::{DepHealth, DepSlot, Health, ServiceState};

/// Slack past a check's deadline before the monitor cancels it. A
/// well-behaved check returns by its deadline; this only catches one that
/// does not, so that no check can ever hang the loop.
pub const CANCEL_GRACE: Duration = Duration::from_millis(250);

/// Longest delay of a dependency's first check after start (or its
/// interval, when shorter): the startup cost of not checking in lockstep.
pub const MAX_FIRST_CHECK_DELAY: Duration = Duration::from_secs(1);

/// Spread of the checks while a dependency is down (±50 % of
/// `interval_down`, or `jitter` when larger; none with `jitter: 0`): every down check lands at a
/// fresh random point of a whole interval, so replicas that an outage lined
/// up (all released by the same timeout, say) do not reconnect together
/// when the dependency returns.
pub const DOWN_JITTER: f64 = 0.5;

/// How often the slow-start gauge follows a ramp.
const RAMP_TICK: Duration = Duration::from_millis(100);

/// Hysteresis: the verdict after one more result.
///
/// The first verdict is taken from the first result, so that startup needs
/// one check round, not `rise` of them; after that `rise` consecutive
/// successes turn a down dependency up and `fall` consecutive failures turn
/// an up one down.
pub fn next_health(current: DepHealth, successes: u32, failures: u32, rise: u32, fall: u32) -> DepHealth {
    match current {
        DepHealth::Unknown if successes > 0 => DepHealth::Up,
        DepHealth::Unknown => DepHealth::Down,
        DepHealth::Up if failures >= fall => DepHealth::Down,
        DepHealth::Down if successes >= rise => DepHealth::Up,
        other => other,
    }
}

/// Runs one check within `timeout` (+ grace), converting a hang into a timeout.
pub async fn run_once(check: &mut AnyCheck, timeout: Duration) -> (Result<(), CheckError>, Duration) {
    let started = Instant::now();
    let deadline = started + timeout;
    let result = match timeout_at(deadline + CANCEL_GRACE, check.check(deadline)).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::new(Cause::ReadTimeout, format!("check did not finish within {timeout:?}"))),
    };
    (result, started.elapsed())
}

/// Monitors the dependency of `slot` until `stop` turns true, then closes the check's
/// connection cleanly.
pub async fn monitor(
    slot: Arc<DepSlot>,
    dep: DependencyConfig,
    mut check: AnyCheck,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let kind = dep.kind.type_name();
    let labels = DepLabels { dependency: dep.name.clone(), r#type: kind.into() };
    let up_gauge = metrics.dependency_up.get_or_create_owned(&labels);
    let duration = metrics.check_duration.get_or_create_owned(&labels);
    let mut status = slot.status();
    let admitted = dep
        .slow_start
        .map(|_| metrics.fleet.admitted_ratio.get_or_create_owned(&DependencyLabels { dependency: dep.name.clone() }));

    // The first check at a random point of the first interval (at most
    // `MAX_FIRST_CHECK_DELAY`), so replicas started together spread out.
    tokio::select! {
        _ = tokio::time::sleep(first_check_delay(dep.interval, dep.jitter)) => {}
        _ = stop.wait_for(|s| *s) => return,
    }

    loop {
        // Intervals run start to start: a check that takes its whole timeout
        // does not push the next one back (unless the timeout is longer than
        // the interval: then the next starts when it ends), so detection
        // stays within `fall × interval + timeout` for timeout <= interval,
        // `interval + (fall - 1) × timeout + timeout` otherwise.
        let started = Instant::now();
        let (result, latency) = tokio::select! {
            r = run_once(&mut check, dep.timeout) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        duration.observe(latency.as_secs_f64());
        status.checks_total += 1;
        status.last_check = Some(SystemTime::now());
        status.last_latency_seconds = Some(latency.as_secs_f64());
        status.last_ok = Some(result.is_ok());
        status.history.push(result.is_ok(), latency);
        match &result {
            Ok(()) => {
                status.consecutive_successes += 1;
                status.consecutive_failures = 0;
            }
            Err(e) => {
                status.consecutive_failures += 1;
                status.consecutive_successes = 0;
                status.last_cause = Some(e.cause);
                status.last_message = Some(e.message.clone());
                metrics.check_failed(&dep.name, e.cause);
                debug!(dependency = %dep.name, cause = %e.cause, message = %e.message, "check failed");
            }
        }
        status.details = check.details();
        for node in &status.details.nodes {
            metrics
                .node_up
                .get_or_create(&NodeLabels { dependency: dep.name.clone(), node: node.address.clone() })
                .set(node.up as i64);
        }

        let next =
            next_health(status.state, status.consecutive_successes, status.consecutive_failures, dep.rise, dep.fall);
        if next != status.state {
            let to = if next == DepHealth::Up { "up" } else { "down" };
            match (&result, next) {
                (_, DepHealth::Up) => info!(
                    dependency = %dep.name, r#type = kind, impact = dep.impact.as_str(),
                    from = ?status.state, "dependency up"
                ),
                (Err(e), _) => warn!(
                    dependency = %dep.name, r#type = kind, impact = dep.impact.as_str(), cause = %e.cause,
                    message = %e.message, failures = status.consecutive_failures, "dependency down"
                ),
                (Ok(()), _) => {}
            }
            metrics.transitions.get_or_create(&TransitionLabels { dependency: dep.name.clone(), to: to.into() }).inc();
            up_gauge.set((next == DepHealth::Up) as i64);
            status.state = next;
            status.since = SystemTime::now();
        }
        let changed = slot.status().state != status.state;
        health.publish_to(&slot, status.clone());
        if let (Some(gauge), true) = (&admitted, changed) {
            gauge.set(health.admitted_share(slot.bit));
            if health.ramping(slot.bit) {
                tokio::spawn(follow_ramp(slot.bit, health.clone(), gauge.clone()));
            }
        }

        let (base, jitter) = match status.state {
            DepHealth::Down if dep.jitter > 0.0 => (dep.interval_down, dep.jitter.max(DOWN_JITTER)),
            DepHealth::Down => (dep.interval_down, 0.0),
            _ => (dep.interval, dep.jitter),
        };
        let wake = started + jittered(base, jitter);
        tokio::select! {
            _ = sleep_until(wake) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Leave the server a clean goodbye (COM_QUIT, connection.close, QUIT).
    check.close(Instant::now() + dep.timeout.min(Duration::from_secs(2))).await;
}

/// Keeps the slow-start gauge on dependency `index`'s ramp and ends the
/// ramp when its window is over (so the request path never writes the mask).
async fn follow_ramp(
    index: usize,
    health: Arc<Health>,
    gauge: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
) {
    while health.ramping(index) {
        let share = health.admitted_share(index);
        gauge.set(share);
        if share >= 1.0 {
            health.end_ramp(index);
            break;
        }
        tokio::time::sleep(RAMP_TICK).await;
    }
    gauge.set(health.admitted_share(index));
}

/// A random delay within `min(interval, MAX_FIRST_CHECK_DELAY)`; none with
/// `jitter: 0`, which asks for a schedule without any randomness.
fn first_check_delay(interval: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return Duration::ZERO;
    }
    let bound = interval.min(MAX_FIRST_CHECK_DELAY);
    bound.mul_f64(rand::rng().random_range(0.0..1.0))
}

/// `base` spread by ±`fraction`, so that many pods do not check in lockstep.
fn jittered(base: Duration, fraction: f64) -> Duration {
    if fraction <= 0.0 {
        return base;
    }
    let f = rand::rng().random_range(-fraction..=fraction);
    base.mul_f64(1.0 + f)
}

/// Derives the service state from the verdicts whenever one changes, keeps
/// the `service_state` gauge current and logs each service transition once.
pub async fn aggregate(health: Arc<Health>, metrics: Arc<Metrics>) {
    metrics.set_service_state(health.service_state().0);
    loop {
        let state = health.compute_service_state();
        if health.set_service_state(state) {
            metrics.set_service_state(state);
            log_service_transition(&health, state);
        }
        health.changed().await;
    }
}

/// The service banners (OUT OF SERVICE, DEGRADED, IN SERVICE, DRAINING), as one structured event each.
fn log_service_transition(health: &Health, state: ServiceState) {
    let down: Vec<String> = health
        .deps()
        .iter()
        .map(|d| (d, d.status()))
        .filter(|(_, s)| s.state == DepHealth::Down)
        .map(|(d, s)| format!("{}({})", d.name, s.last_cause.map(Cause::as_str).unwrap_or("unknown")))
        .collect();
    let down = down.join(",");
    match state {
        ServiceState::OutOfService => {
            error!(state = state.as_str(), dependencies = %down, "OUT OF SERVICE: a critical dependency is down; requests are answered 503")
        }
        ServiceState::Degraded => {
            warn!(state = state.as_str(), dependencies = %down, "DEGRADED: a degraded dependency is down; requests are answered 500")
        }
        ServiceState::InService => info!(state = state.as_str(), "IN SERVICE: every dependency is up"),
        ServiceState::Draining if health.is_draining() => {
            info!(state = state.as_str(), "DRAINING: shutdown requested; readiness fails")
        }
        ServiceState::Draining => {
            warn!(state = state.as_str(), "DRAINING: operator drain; readiness fails, requests are still proxied")
        }
        ServiceState::Maintenance => {
            warn!(
                state = state.as_str(),
                "MAINTENANCE: operator maintenance; readiness fails, requests are answered 503"
            )
        }
        ServiceState::Starting => info!(state = state.as_str(), "STARTING: waiting for the first check round"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DepHealth::*;

    #[test]
    fn first_result_decides_the_first_verdict() {
        assert_eq!(next_health(Unknown, 1, 0, 3, 3), Up);
        assert_eq!(next_health(Unknown, 0, 1, 3, 3), Down);
    }

    #[test]
    fn up_needs_fall_consecutive_failures_to_go_down() {
        assert_eq!(next_health(Up, 0, 1, 2, 2), Up);
        assert_eq!(next_health(Up, 0, 2, 2, 2), Down);
    }

    #[test]
    fn down_needs_rise_consecutive_successes_to_go_up() {
        assert_eq!(next_health(Down, 1, 0, 2, 2), Down);
        assert_eq!(next_health(Down, 2, 0, 2, 2), Up);
    }

    #[test]
    fn the_first_check_waits_at_most_one_interval_or_one_second() {
        for _ in 0..1000 {
            assert!(first_check_delay(Duration::from_millis(200), 0.1) < Duration::from_millis(200));
            assert!(first_check_delay(Duration::from_secs(30), 0.1) < MAX_FIRST_CHECK_DELAY);
        }
        assert_eq!(first_check_delay(Duration::from_secs(30), 0.0), Duration::ZERO);
        // Spread, not constant: the delays of a thousand replicas cover the bound.
        let ms: Vec<u128> = (0..1000).map(|_| first_check_delay(Duration::from_secs(1), 0.1).as_millis()).collect();
        assert!(ms.iter().any(|&m| m < 100) && ms.iter().any(|&m| m > 900), "{:?}", &ms[..10]);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(2), 0.1);
            assert!(d >= Duration::from_millis(1800) && d <= Duration::from_millis(2200), "{d:?}");
        }
        assert_eq!(jittered(Duration::from_secs(2), 0.0), Duration::from_secs(2));
    }
}
