//! The `fleet` section (peers, the fleet readiness policy) and the
//! per-dependency `slow_start` block: what lets the replicas of a Deployment
//! decide together instead of one pod at a time.

use std::path::PathBuf;
use std::time::Duration;

use super::hostport::HostPort;
use super::node::Map;
use super::problem::Problems;

/// Keys of `fleet`.
pub const KEYS: &[&str] = &[
    "instance_id",
    "peers",
    "resolve_interval",
    "poll_interval",
    "timeout",
    "max_peers_per_round",
    "freshness",
    "readiness",
    "settle",
    "hysteresis",
    "min_views",
];
/// Keys of `fleet.peers`.
pub const PEER_KEYS: &[&str] = &["dns", "port", "static", "file"];
/// Keys of a dependency's `slow_start`.
pub const SLOW_START_KEYS: &[&str] = &["window", "floor"];

/// Default time between two re-resolutions of the peer list.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default time between two rounds of peer polls.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Default bound on one peer call (connect, request, whole body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default number of peers asked per round.
pub const DEFAULT_MAX_PEERS_PER_ROUND: usize = 8;
/// Highest `max_peers_per_round` accepted.
pub const MAX_MAX_PEERS_PER_ROUND: usize = 64;
/// Highest `min_views` accepted.
pub const MAX_MIN_VIEWS: usize = 1000;
/// Default hysteresis band around the majority, in share points.
pub const DEFAULT_HYSTERESIS: f64 = 0.1;
/// Highest hysteresis band accepted (above it no majority could ever win).
pub const MAX_HYSTERESIS: f64 = 0.4;
/// Default floor of a slow start: the share of requests admitted at once.
pub const DEFAULT_SLOW_START_FLOOR: f64 = 0.1;

/// Where the peers are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSource {
    /// Every A/AAAA record of a name (a headless Service), re-resolved every
    /// `resolve_interval`, at one admin port.
    Dns {
        /// The name.
        name: String,
        /// The peers' admin port.
        port: u16,
    },
    /// A fixed list of `host:port` admin addresses.
    Static(Vec<HostPort>),
    /// A file with one `host:port` a line, re-read every `resolve_interval`
    /// (for lists known only after start, or kept by another tool).
    File {
        /// The file.
        path: PathBuf,
        /// Port of an entry written without one.
        port: u16,
    },
}

/// What the fleet view changes about readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetReadiness {
    /// Peers are polled and shown, readiness is decided by the local settings alone.
    Local,
    /// A failure most peers also see keeps the pod Ready (it answers 503
    /// itself); one most peers do not see fails its readiness.
    SharedOutage,
}

impl FleetReadiness {
    const CHOICES: &[(&str, FleetReadiness)] =
        &[("local", FleetReadiness::Local), ("shared_outage", FleetReadiness::SharedOutage)];
}

/// The `fleet` section.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// This instance's id (excluded from its own peer list); `$HOSTNAME` by default.
    pub instance_id: String,
    /// Where the peers are.
    pub peers: PeerSource,
    /// Re-resolution period of `dns` and `file` peers.
    pub resolve_interval: Duration,
    /// Time between two rounds of peer polls (start to start).
    pub poll_interval: Duration,
    /// Bound on one peer call.
    pub timeout: Duration,
    /// Most peers asked per round (a random sample beyond it).
    pub max_peers_per_round: usize,
    /// A peer view older than this is ignored.
    pub freshness: Duration,
    /// The readiness policy.
    pub readiness: FleetReadiness,
    /// How long a local failure that most peers do not see keeps the pod
    /// Ready before it is judged local; `None`: per dependency, its
    /// `interval + timeout + poll_interval` (the other pods' detection lag
    /// plus one round).
    pub settle: Option<Duration>,
    /// Band around one half: peers must see a dependency up (or down) by
    /// more than `0.5 + hysteresis` to change the fleet verdict.
    pub hysteresis: f64,
    /// Fewest fresh views (with a verdict) needed to decide.
    pub min_views: usize,
}

/// A dependency's herd-safe recovery ramp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    /// Time from the floor to every request.
    pub window: Duration,
    /// Share admitted at the start of the window (0 < floor ≤ 1).
    pub floor: f64,
}

/// This host's name: `$HOSTNAME` (a pod's name), else the kernel's.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "healthgate".into())
}

/// Reads the `fleet` section; `admin_port` is the default peer port.
pub(super) fn fleet(f: &Map<'_>, admin_port: u16, p: &mut Problems) -> Option<FleetConfig> {
    let before = p.count();
    f.deny_unknown(KEYS, p);
    let positive = |k: &str, default: Duration, p: &mut Problems| match f.duration(k, p) {
        Some(d) if d.value.is_zero() => {
            p.at(d.pos, f.key(k), "must be greater than zero");
            default
        }
        Some(d) => d.value,
        None => default,
    };
    let resolve_interval = positive("resolve_interval", DEFAULT_RESOLVE_INTERVAL, p);
    let poll_interval = positive("poll_interval", DEFAULT_POLL_INTERVAL, p);
    let timeout = positive("timeout", DEFAULT_TIMEOUT, p);
    let freshness = positive("freshness", poll_interval * 3, p);
    if let Some(d) = f.duration("freshness", &mut Problems::default())
        && d.value < poll_interval
    {
        p.at(d.pos, f.key("freshness"), "must be at least poll_interval (no view would ever be fresh)");
    }
    let settle = f.duration("settle", p).map(|d| d.value);
    let max_peers_per_round = match f.int::<usize>("max_peers_per_round", p) {
        Some(n) if n.value == 0 || n.value > MAX_MAX_PEERS_PER_ROUND => {
            p.at(n.pos, f.key("max_peers_per_round"), format!("must be between 1 and {MAX_MAX_PEERS_PER_ROUND}"));
            DEFAULT_MAX_PEERS_PER_ROUND
        }
        Some(n) => n.value,
        None => DEFAULT_MAX_PEERS_PER_ROUND,
    };
    let min_views = match f.int::<usize>("min_views", p) {
        Some(n) if n.value == 0 || n.value > MAX_MIN_VIEWS => {
            p.at(n.pos, f.key("min_views"), format!("must be between 1 and {MAX_MIN_VIEWS}"));
            1
        }
        Some(n) => n.value,
        None => 1,
    };
    let hysteresis = match f.float("hysteresis", p) {
        Some(h) if !(0.0..=MAX_HYSTERESIS).contains(&h.value) => {
            p.at(h.pos, f.key("hysteresis"), format!("must be between 0.0 and {MAX_HYSTERESIS}"));
            DEFAULT_HYSTERESIS
        }
        Some(h) => h.value,
        None => DEFAULT_HYSTERESIS,
    };
    let readiness = f.choice("readiness", FleetReadiness::CHOICES, p).map_or(FleetReadiness::Local, |r| r.value);
    let instance_id = match f.str("instance_id", p) {
        Some(id) if id.value.trim().is_empty() || id.value.len() > 253 => {
            p.at(id.pos, f.key("instance_id"), "must be 1 to 253 characters");
            String::new()
        }
        Some(id) => id.value,
        None => hostname(),
    };
    let peers = match f.map("peers", p) {
        Some(m) => peers(&m, admin_port, p),
        None => {
            f.missing("peers", p);
            None
        }
    };
    let peers = peers?;
    (p.count() == before).then_some(FleetConfig {
        instance_id,
        peers,
        resolve_interval,
        poll_interval,
        timeout,
        max_peers_per_round,
        freshness,
        readiness,
        settle,
        hysteresis,
        min_views,
    })
}

/// Reads `fleet.peers`: exactly one of `dns`, `static`, `file`.
fn peers(m: &Map<'_>, admin_port: u16, p: &mut Problems) -> Option<PeerSource> {
    m.deny_unknown(PEER_KEYS, p);
    let port = match m.int::<u16>("port", p) {
        Some(n) if n.value == 0 => {
            p.at(n.pos, m.key("port"), "must be between 1 and 65535");
            admin_port
        }
        Some(n) => n.value,
        None => admin_port,
    };
    let written: Vec<&str> = ["dns", "static", "file"].into_iter().filter(|k| m.has(k)).collect();
    if written.len() != 1 {
        let pos = written.get(1).and_then(|k| m.get(k)).map_or(m.pos, |n| n.pos);
        p.at(pos, m.key(written.get(1).copied().unwrap_or("dns")), "set exactly one of `dns`, `static`, `file`");
        return None;
    }
    match written[0] {
        "dns" => {
            let name = m.str("dns", p)?;
            if HostPort::parse(&name.value, Some(port)).map(|h| h.port != port || h.host != name.value).unwrap_or(true)
            {
                p.at(name.pos, m.key("dns"), "must be a host name without a port (the port is `port`)");
                return None;
            }
            Some(PeerSource::Dns { name: name.value, port })
        }
        "static" => {
            let list = m.str_list("static", p)?;
            if list.value.is_empty() {
                p.at(list.pos, m.key("static"), "must list at least one host:port");
            }
            let mut out = Vec::new();
            for a in &list.value {
                match HostPort::parse(&a.value, Some(port)) {
                    Ok(h) => out.push(h),
                    Err(e) => p.at(a.pos, m.key("static"), e.to_string()),
                }
            }
            Some(PeerSource::Static(out))
        }
        _ => {
            let f = m.str("file", p)?;
            if f.value.trim().is_empty() {
                p.at(f.pos, m.key("file"), "must name a file");
            }
            Some(PeerSource::File { path: PathBuf::from(f.value), port })
        }
    }
}

/// Parses a peer file: one `host:port` (or `host`, with `port`) a line;
/// blank lines and `#` comments are skipped, unreadable entries reported.
pub fn parse_peer_file(text: &str, port: u16) -> (Vec<HostPort>, Vec<String>) {
    let mut peers = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match HostPort::parse(line, Some(port)) {
            Ok(h) => peers.push(h),
            Err(e) => bad.push(format!("line {}: {e}", i + 1)),
        }
    }
    (peers, bad)
}

/// Reads a dependency's `slow_start` block.
pub(super) fn slow_start(m: &Map<'_>, p: &mut Problems) -> Option<SlowStart> {
    m.deny_unknown(SLOW_START_KEYS, p);
    let window = match m.duration("window", p) {
        Some(w) if w.value.is_zero() => {
            p.at(w.pos, m.key("window"), "must be greater than zero");
            return None;
        }
        Some(w) => w.value,
        None => {
            m.missing("window", p);
            return None;
        }
    };
    let floor = match m.float("floor", p) {
        Some(f) if !(f.value > 0.0 && f.value <= 1.0) => {
            p.at(f.pos, m.key("floor"), "must be more than 0.0 and at most 1.0");
            return None;
        }
        Some(f) => f.value,
        None => DEFAULT_SLOW_START_FLOOR,
    };
    Some(SlowStart { window, floor })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use std::path::Path;

    const BASE: &str = "admin:\n  listen: 0.0.0.0:9901\nlisteners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n";

    fn load(extra: &str) -> Result<Config, Vec<(String, u64, String)>> {
        match Config::from_yaml(&format!("{BASE}{extra}"), Path::new("t.yaml")) {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid { problems, .. }) => {
                Err(problems.into_iter().map(|p| (p.key, p.line, p.message)).collect())
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_dns_fleet_takes_the_admin_port_and_the_defaults() {
        let c = load("fleet:\n  instance_id: pod-a\n  peers:\n    dns: hg-peers.default.svc\n").unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.peers, PeerSource::Dns { name: "hg-peers.default.svc".into(), port: 9901 });
        assert_eq!(f.instance_id, "pod-a");
        assert_eq!(f.readiness, FleetReadiness::Local);
        assert_eq!(f.poll_interval, DEFAULT_POLL_INTERVAL);
        assert_eq!(f.freshness, DEFAULT_POLL_INTERVAL * 3);
        assert_eq!(f.max_peers_per_round, DEFAULT_MAX_PEERS_PER_ROUND);
    }

    #[test]
    fn a_static_fleet_with_the_shared_outage_policy_loads_its_values() {
        let c = load(
            "fleet:\n  peers:\n    static: [\"10.0.0.1:9000\", \"10.0.0.2\"]\n  readiness: shared_outage\n  poll_interval: 2s\n  settle: 4s\n  hysteresis: 0.2\n",
        )
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(
            f.peers,
            PeerSource::Static(vec![
                HostPort { host: "10.0.0.1".into(), port: 9000 },
                HostPort { host: "10.0.0.2".into(), port: 9901 }
            ])
        );
        assert_eq!(f.readiness, FleetReadiness::SharedOutage);
        assert_eq!((f.settle, f.hysteresis), (Some(Duration::from_secs(4)), 0.2));
        assert_eq!(f.freshness, Duration::from_secs(6));
    }

    #[test]
    fn two_peer_sources_and_bad_values_are_reported_at_their_lines() {
        let p = load(
            "fleet:\n  peers:\n    dns: a.b\n    static: [x:1]\n  readiness: shared_outge\n  max_peers_per_round: 0\n  hysteresis: 0.6\n",
        )
        .unwrap_err();
        let keys: Vec<_> = p.iter().map(|(k, l, _)| (k.as_str(), *l)).collect();
        assert_eq!(
            keys,
            [
                ("fleet.peers.static", 10),
                ("fleet.readiness", 11),
                ("fleet.max_peers_per_round", 12),
                ("fleet.hysteresis", 13)
            ],
            "{p:?}"
        );
        assert!(p[1].2.contains("did you mean `shared_outage`"), "{p:?}");
    }

    #[test]
    fn fleet_without_peers_and_a_dns_name_with_a_port_are_errors() {
        let p = load("fleet:\n  readiness: local\n").unwrap_err();
        assert_eq!(p[0].0, "fleet.peers", "{p:?}");
        let p = load("fleet:\n  peers:\n    dns: peers:9901\n").unwrap_err();
        assert_eq!(p[0].0, "fleet.peers.dns", "{p:?}");
    }

    #[test]
    fn slow_start_needs_a_window_and_a_floor_within_zero_and_one() {
        let dep = "dependencies:\n  - name: db\n    type: tcp\n    address: a:1\n";
        let c = load(&format!("{dep}    slow_start:\n      window: 30s\n")).unwrap();
        assert_eq!(
            c.dependencies[0].slow_start,
            Some(SlowStart { window: Duration::from_secs(30), floor: DEFAULT_SLOW_START_FLOOR })
        );
        let p = load(&format!("{dep}    slow_start:\n      window: 30s\n      floor: 0\n")).unwrap_err();
        assert_eq!(p[0].0, "dependencies[0].slow_start.floor", "{p:?}");
        let p = load(&format!("{dep}    slow_start:\n      floor: 0.5\n")).unwrap_err();
        assert!(p[0].2.contains("window"), "{p:?}");
        assert_eq!(load(dep).unwrap().dependencies[0].slow_start, None);
    }

    #[test]
    fn a_peer_file_skips_comments_and_reports_bad_lines() {
        let (peers, bad) = parse_peer_file("# fleet\n127.0.0.1:9001\n\nhost-b\n[::1]:x\n", 9901);
        assert_eq!(
            peers,
            vec![HostPort { host: "127.0.0.1".into(), port: 9001 }, HostPort { host: "host-b".into(), port: 9901 }]
        );
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].starts_with("line 5"), "{bad:?}");
    }
}
