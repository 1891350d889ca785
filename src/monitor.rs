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

    let schedule = Schedule { interval: dep.interval, interval_down: dep.interval_down, jitter: dep.jitter };
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

        let draw = rand::rng().random_range(0.0..1.0);
        let wake = schedule.next_start(started, Instant::now(), status.state, changed, draw);
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

/// When a dependency's checks start: start to start, spread so that many
/// replicas do not check in lockstep.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    interval: Duration,
    interval_down: Duration,
    /// ±fraction of each interval; 0 turns every randomness off.
    jitter: f64,
}

impl Schedule {
    /// The start of the check after the one that started at `started` and
    /// ended at `now` with the verdict `state` (`changed`: that check changed
    /// it). `draw` is uniform in [0, 1).
    ///
    /// Each interval (`interval`, or `interval_down` while down) is spread by
    /// ±`jitter`. Going down, and after a check that overran its interval,
    /// the next check comes at a random point of one `interval_down`: a
    /// fleet's down checks then sit evenly over that interval (from any
    /// instant, the next arrival is uniform over `(1 − jitter) ×
    /// interval_down` and fades out by `(1 + jitter) × interval_down`), so
    /// when the dependency returns the replicas reconnect spread over one
    /// interval, not in a burst, each within `(1 + jitter) × interval_down`.
    /// A server that releases every waiting client at once (a backlog
    /// accepted together, a black hole lifted) ends checks together; the
    /// redraw after the overrun spreads them again, and the jitter keeps
    /// phases drifting apart. A wide spread each round (±50 %) would not be
    /// even: its next-arrival density falls from half an interval on.
    fn next_start(&self, started: Instant, now: Instant, state: DepHealth, changed: bool, draw: f64) -> Instant {
        match state {
            DepHealth::Down if self.jitter > 0.0 => {
                let next = started + jittered(self.interval_down, self.jitter, draw);
                if changed || next <= now { now + self.interval_down.mul_f64(draw) } else { next }
            }
            DepHealth::Down => started + self.interval_down,
            _ => started + jittered(self.interval, self.jitter, draw),
        }
    }
}

/// `base` spread by ±`fraction`, `draw` (uniform in [0, 1)) choosing where.
fn jittered(base: Duration, fraction: f64, draw: f64) -> Duration {
    base.mul_f64(1.0 + fraction * (2.0 * draw - 1.0))
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
        let two = Duration::from_secs(2);
        assert_eq!(jittered(two, 0.1, 0.0), Duration::from_millis(1800));
        assert_eq!(jittered(two, 0.1, 0.5), two);
        assert!(jittered(two, 0.1, 0.999_999) < Duration::from_millis(2200));
        assert_eq!(jittered(two, 0.0, 0.9), two);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const SCHEDULE: Schedule =
        Schedule { interval: Duration::from_secs(2), interval_down: Duration::from_secs(1), jitter: 0.1 };

    #[test]
    fn while_up_checks_start_a_jittered_interval_after_the_last_start() {
        let t0 = Instant::now();
        assert_eq!(SCHEDULE.next_start(t0, t0 + ms(50), Up, false, 0.5), t0 + ms(2000));
        assert_eq!(SCHEDULE.next_start(t0, t0 + ms(50), Up, true, 0.0), t0 + ms(1800));
        assert_eq!(SCHEDULE.next_start(t0, t0 + ms(50), Unknown, false, 0.75), t0 + ms(2100));
    }

    #[test]
    fn going_down_draws_a_phase_within_one_interval_down() {
        let t0 = Instant::now();
        let end = t0 + ms(300);
        assert_eq!(SCHEDULE.next_start(t0, end, Down, true, 0.0), end);
        assert_eq!(SCHEDULE.next_start(t0, end, Down, true, 0.25), end + ms(250));
        assert!(SCHEDULE.next_start(t0, end, Down, true, 0.999_999) < end + ms(1000));
    }

    #[test]
    fn while_down_checks_start_a_jittered_interval_down_after_the_last_start() {
        let t0 = Instant::now();
        assert_eq!(SCHEDULE.next_start(t0, t0 + ms(400), Down, false, 0.0), t0 + ms(900));
        assert_eq!(SCHEDULE.next_start(t0, t0 + ms(400), Down, false, 0.5), t0 + ms(1000));
        assert!(SCHEDULE.next_start(t0, t0 + ms(400), Down, false, 0.999_999) < t0 + ms(1100));
    }

    #[test]
    fn a_check_that_overran_its_interval_while_down_draws_a_new_phase() {
        let t0 = Instant::now();
        let end = t0 + ms(1500);
        assert_eq!(SCHEDULE.next_start(t0, end, Down, false, 0.0), end);
        assert_eq!(SCHEDULE.next_start(t0, end, Down, false, 0.6), end + ms(600));
    }

    #[test]
    fn jitter_zero_keeps_a_fixed_schedule_while_down() {
        let fixed = Schedule { jitter: 0.0, ..SCHEDULE };
        let t0 = Instant::now();
        assert_eq!(fixed.next_start(t0, t0 + ms(100), Down, true, 0.7), t0 + ms(1000));
        assert_eq!(fixed.next_start(t0, t0 + ms(100), Up, true, 0.7), t0 + ms(2000));
    }

    /// The point of the schedule: a fleet that went down at random moments
    /// reconnects evenly over one interval_down after the return, all within
    /// (1 + jitter) × interval_down. Replays 2 000 replicas' schedules with
    /// made-up instants.
    #[test]
    fn a_fleet_that_went_down_at_random_moments_returns_evenly_over_one_interval_down() {
        let t0 = Instant::now();
        let mut rng = rand::rng();
        let back = t0 + Duration::from_secs(10);
        let mut bins = [0u32; 11];
        for _ in 0..2000 {
            // Down at a random moment within the first 2 s; failing checks take 5 ms.
            let mut started = t0 + Duration::from_secs(2).mul_f64(rng.random_range(0.0..1.0));
            let mut changed = true;
            while started < back {
                let end = started + ms(5);
                started = SCHEDULE.next_start(started, end, Down, changed, rng.random_range(0.0..1.0));
                changed = false;
            }
            let after = started - back;
            assert!(after < ms(1100), "{after:?}");
            bins[(after.as_millis() / 100) as usize] += 1;
        }
        // 200 expected in each 100 ms up to 0.9 s; from there the jitter fades
        // the density out linearly to 1.1 s (150 and 50 expected in the last
        // two bins). A density that falls earlier, or a peak, would empty or
        // overfill bins (bounds ±4.5 standard deviations).
        assert!(bins[..9].iter().all(|&n| (140..=260).contains(&n)), "{bins:?}");
        assert!((100..=200).contains(&bins[9]) && (15..=90).contains(&bins[10]), "{bins:?}");
    }
}
