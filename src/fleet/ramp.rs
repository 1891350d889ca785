//! Herd-safe recovery: the slow-start ramp and the cheap admission draw the
//! request path uses while a dependency ramps. Pure and lock-free; imports
//! nothing of the crate, so the bottom layers (`state`) may use it.

use std::cell::Cell;
use std::time::Duration;

/// The share of requests admitted `elapsed` after a dependency came back up,
/// rising linearly from `floor` at 0 to 1.0 at `window` (and staying there).
pub fn share(elapsed: Duration, window: Duration, floor: f64) -> f64 {
    if window.is_zero() || elapsed >= window {
        return 1.0;
    }
    let floor = floor.clamp(0.0, 1.0);
    let t = elapsed.as_secs_f64() / window.as_secs_f64();
    floor + (1.0 - floor) * t
}

thread_local! {
    /// This thread's position in the admission sequence.
    static SEQUENCE: Cell<u64> = Cell::new(seed());
}

/// A per-thread starting point, so that workers do not admit in step.
fn seed() -> u64 {
    rand::random()
}

/// 2^64 / φ: the Weyl step whose multiples spread most evenly over [0, 1).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Whether to admit one request when a `share` of them should be.
///
/// A per-thread Weyl sequence (one add, no lock, no shared write): its
/// points are spread so evenly that over any n consecutive draws the
/// admitted count is within about one of `share × n`, where a random draw
/// would stray by √n.
#[inline]
pub fn admit(share: f64) -> bool {
    if share >= 1.0 {
        return true;
    }
    let x = SEQUENCE.with(|s| {
        let x = s.get().wrapping_add(GOLDEN);
        s.set(x);
        x
    });
    // The top 53 bits as a fraction in [0, 1).
    ((x >> 11) as f64 / (1u64 << 53) as f64) < share
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn the_ramp_starts_at_the_floor_and_reaches_every_request_at_the_window() {
        assert_eq!(share(Duration::ZERO, WINDOW, 0.1), 0.1);
        assert!((share(WINDOW / 10, WINDOW, 0.1) - 0.19).abs() < 1e-9);
        assert!((share(WINDOW / 2, WINDOW, 0.1) - 0.55).abs() < 1e-9);
        assert_eq!(share(WINDOW, WINDOW, 0.1), 1.0);
        assert_eq!(share(WINDOW * 5, WINDOW, 0.1), 1.0);
        assert_eq!(share(Duration::from_secs(3), Duration::ZERO, 0.1), 1.0);
    }

    #[test]
    fn the_ramp_never_decreases() {
        let mut last = 0.0;
        for ms in (0..=61_000).step_by(250) {
            let s = share(Duration::from_millis(ms), WINDOW, 0.25);
            assert!(s >= last && (0.25..=1.0).contains(&s), "{ms}: {s}");
            last = s;
        }
    }

    /// Admitted share over 1000 draws at 10 %, 50 % and 100 % of the window.
    #[test]
    fn admitted_share_follows_the_ramp_within_one_point() {
        for at in [WINDOW / 10, WINDOW / 2, WINDOW] {
            let want = share(at, WINDOW, 0.1);
            let admitted = (0..1000).filter(|_| admit(want)).count() as f64 / 1000.0;
            assert!((admitted - want).abs() <= 0.01, "at {at:?}: admitted {admitted}, ramp {want}");
        }
    }

    #[test]
    fn a_share_of_zero_admits_nothing_and_one_admits_all() {
        assert!((0..1000).all(|_| !admit(0.0)));
        assert!((0..1000).all(|_| admit(1.0)));
    }
}
