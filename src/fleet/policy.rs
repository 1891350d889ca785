//! The fleet readiness policy as pure functions of (views, now, freshness,
//! hysteresis): what the fresh peer views say about a dependency, what that
//! means for this pod, and whether it stays Ready while out of service.
//! Time comes in as arguments, so every decision is tested with made-up
//! instants.

use std::time::{Duration, Instant};

use serde::Serialize;

/// A dependency's verdict as a peer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// The peer has no verdict yet.
    Unknown,
    /// The peer sees it up.
    Up,
    /// The peer sees it down.
    Down,
}

/// How the fresh views split on one dependency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Fresh views that name the dependency.
    pub fresh: usize,
    /// Of those, seeing it up.
    pub up: usize,
    /// Of those, seeing it down.
    pub down: usize,
}

impl Tally {
    /// Share of the fresh views with a verdict that see it up (`None`: no such view).
    pub fn up_share(&self) -> Option<f64> {
        let n = self.up + self.down;
        (n > 0).then(|| self.up as f64 / n as f64)
    }
}

/// Counts the views received at or after `now - freshness`; each item is
/// (when the view arrived, what it says of the dependency).
pub fn tally(views: impl IntoIterator<Item = (Instant, PeerState)>, now: Instant, freshness: Duration) -> Tally {
    let mut t = Tally::default();
    for (received, state) in views {
        if now.saturating_duration_since(received) > freshness {
            continue;
        }
        t.fresh += 1;
        match state {
            PeerState::Up => t.up += 1,
            PeerState::Down => t.down += 1,
            PeerState::Unknown => {}
        }
    }
    t
}

/// What the fleet says about one dependency, after hysteresis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Consensus {
    /// Too few fresh views, or no majority yet: no opinion.
    None,
    /// Most fresh views see it up.
    Up,
    /// Most fresh views see it down.
    Down,
}

impl Consensus {
    /// Compact encoding for an atomic.
    pub fn to_u8(self) -> u8 {
        match self {
            Consensus::None => 0,
            Consensus::Up => 1,
            Consensus::Down => 2,
        }
    }

    /// Inverse of [`Consensus::to_u8`].
    pub fn from_u8(v: u8) -> Consensus {
        match v {
            1 => Consensus::Up,
            2 => Consensus::Down,
            _ => Consensus::None,
        }
    }
}

/// The consensus after a new tally.
///
/// A side wins with more than half of the views with a verdict and at least
/// `0.5 + hysteresis` of them; in between, the previous consensus holds
/// (a Schmitt trigger), so a fleet split near one half does not flap. Fewer
/// than `min_views` views with a verdict give no opinion at all.
pub fn consensus(prev: Consensus, t: Tally, min_views: usize, hysteresis: f64) -> Consensus {
    let n = t.up + t.down;
    if n == 0 || n < min_views {
        return Consensus::None;
    }
    let up = t.up as f64 / n as f64;
    let down = t.down as f64 / n as f64;
    let need = 0.5 + hysteresis;
    if up > 0.5 && up >= need {
        Consensus::Up
    } else if down > 0.5 && down >= need {
        Consensus::Down
    } else {
        prev
    }
}

/// What this pod makes of a dependency, given its own verdict and the fleet's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Up (or unknown) here: nothing to decide.
    Healthy,
    /// Down here and the fleet has no opinion: the local settings decide.
    Alone,
    /// Down here, up for most peers, for less than `settle`: the others may
    /// not have noticed a shared outage yet, so the pod stays Ready.
    Settling,
    /// Down here, up for most peers: the failure is this pod's own; it
    /// fails readiness (and keeps answering 503 while it is in the Service).
    LocalFailure,
    /// Down here and for most peers: a shared outage; the pod stays Ready
    /// and answers 503 itself.
    SharedOutage,
}

impl Verdict {
    /// Every verdict, for the metric.
    pub const ALL: [Verdict; 5] =
        [Verdict::Healthy, Verdict::Alone, Verdict::Settling, Verdict::LocalFailure, Verdict::SharedOutage];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Alone => "alone",
            Verdict::Settling => "settling",
            Verdict::LocalFailure => "local_failure",
            Verdict::SharedOutage => "shared_outage",
        }
    }
}

/// The verdict for a dependency that is down here since `down_for` ago
/// (`None`: not down here).
pub fn verdict(down_for: Option<Duration>, consensus: Consensus, settle: Duration) -> Verdict {
    let Some(down_for) = down_for else { return Verdict::Healthy };
    match consensus {
        Consensus::None => Verdict::Alone,
        Consensus::Down => Verdict::SharedOutage,
        Consensus::Up if down_for < settle => Verdict::Settling,
        Consensus::Up => Verdict::LocalFailure,
    }
}

/// `/readyz` while out of service, from the verdicts of the `out_of_service`
/// dependencies that are down here: any local failure fails it; a shared
/// outage (or one settling) on every one of them keeps the pod Ready; any
/// dependency the fleet has no opinion on leaves it to `fallback` (the local
/// `ready_when_out_of_service`), exactly as without a fleet.
pub fn ready_out_of_service(verdicts: impl IntoIterator<Item = Verdict>, fallback: bool) -> bool {
    let mut any = false;
    let mut all_shared = true;
    for v in verdicts {
        match v {
            Verdict::LocalFailure => return false,
            Verdict::SharedOutage | Verdict::Settling => any = true,
            Verdict::Alone => all_shared = false,
            Verdict::Healthy => {}
        }
    }
    if any && all_shared { true } else { fallback }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PeerState::*;

    const FRESH: Duration = Duration::from_secs(3);
    const H: f64 = 0.1;

    fn views(now: Instant, states: &[(u64, PeerState)]) -> Vec<(Instant, PeerState)> {
        states.iter().map(|(age_ms, s)| (now - Duration::from_millis(*age_ms), *s)).collect()
    }

    #[test]
    fn stale_views_are_ignored_and_unknown_ones_have_no_vote() {
        let now = Instant::now() + Duration::from_secs(60);
        let t = tally(views(now, &[(100, Up), (2_900, Down), (3_100, Down), (50, Unknown)]), now, FRESH);
        assert_eq!(t, Tally { fresh: 3, up: 1, down: 1 });
        assert_eq!(t.up_share(), Some(0.5));
        assert_eq!(tally(views(now, &[(5_000, Up)]), now, FRESH).up_share(), None);
    }

    #[test]
    fn most_fresh_views_decide_and_no_view_is_no_opinion() {
        let t = |up, down| Tally { fresh: up + down, up, down };
        assert_eq!(consensus(Consensus::None, t(3, 1), 1, H), Consensus::Up);
        assert_eq!(consensus(Consensus::None, t(1, 3), 1, H), Consensus::Down);
        assert_eq!(consensus(Consensus::None, t(0, 0), 1, H), Consensus::None);
        assert_eq!(consensus(Consensus::Up, Tally { fresh: 2, up: 0, down: 0 }, 1, H), Consensus::None);
        // Below min_views, even a unanimous fleet has no opinion.
        assert_eq!(consensus(Consensus::Down, t(0, 2), 3, H), Consensus::None);
    }

    #[test]
    fn a_split_near_one_half_keeps_the_previous_consensus() {
        let t = |up, down| Tally { fresh: up + down, up, down };
        // 2 of 4: a tie never wins.
        assert_eq!(consensus(Consensus::Up, t(2, 2), 1, H), Consensus::Up);
        assert_eq!(consensus(Consensus::Down, t(2, 2), 1, H), Consensus::Down);
        assert_eq!(consensus(Consensus::None, t(2, 2), 1, H), Consensus::None);
        // 11 of 20 up is a majority, but inside the band: no change.
        assert_eq!(consensus(Consensus::Down, t(11, 9), 1, H), Consensus::Down);
        assert_eq!(consensus(Consensus::Down, t(12, 8), 1, H), Consensus::Up);
        // Without a band, a bare majority flips it.
        assert_eq!(consensus(Consensus::Down, t(11, 9), 1, 0.0), Consensus::Up);
    }

    #[test]
    fn a_failure_most_peers_do_not_see_is_local_after_settle() {
        let settle = Duration::from_secs(3);
        assert_eq!(verdict(None, Consensus::Up, settle), Verdict::Healthy);
        assert_eq!(verdict(Some(Duration::from_secs(1)), Consensus::Up, settle), Verdict::Settling);
        assert_eq!(verdict(Some(Duration::from_secs(3)), Consensus::Up, settle), Verdict::LocalFailure);
        assert_eq!(verdict(Some(Duration::ZERO), Consensus::Down, settle), Verdict::SharedOutage);
        assert_eq!(verdict(Some(Duration::from_secs(99)), Consensus::None, settle), Verdict::Alone);
    }

    #[test]
    fn readiness_fails_on_any_local_failure_and_holds_only_when_every_outage_is_shared() {
        use Verdict::*;
        assert!(!ready_out_of_service([SharedOutage, LocalFailure], true));
        assert!(ready_out_of_service([SharedOutage, Settling], false));
        assert!(ready_out_of_service([SharedOutage, Healthy], false));
        // The fleet has no opinion on one of them: the local setting decides.
        assert!(!ready_out_of_service([SharedOutage, Alone], false));
        assert!(ready_out_of_service([Alone], true));
        assert!(!ready_out_of_service([], false));
    }

    /// A shared outage seen by one peer after another: the pod that noticed
    /// first settles, then holds Ready once most peers agree, and never
    /// passes through LocalFailure on the way.
    #[test]
    fn a_shared_outage_noticed_one_peer_at_a_time_never_fails_readiness() {
        let start = Instant::now();
        let settle = Duration::from_secs(3);
        let mut c = Consensus::Up;
        // Peers notice at 0.5 s, 1.2 s, 1.9 s and 2.4 s after this pod.
        let noticed = [500u64, 1_200, 1_900, 2_400];
        for ms in (0..6_000).step_by(100) {
            let now = start + Duration::from_millis(ms);
            let peer_views = noticed.iter().map(|&at| (now, if ms >= at { Down } else { Up }));
            c = consensus(c, tally(peer_views, now, FRESH), 1, H);
            let v = verdict(Some(Duration::from_millis(ms)), c, settle);
            assert!(ready_out_of_service([v], false), "at {ms} ms: {v:?} ({c:?})");
        }
        assert_eq!(c, Consensus::Down);
    }
}
