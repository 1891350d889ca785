//! The `admin` section: the admin server's address, readiness rules, the
//! limits that keep it answering under a flood of clients, and the optional
//! `control` block that turns on the authenticated runtime control API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::listener;
use super::node::Map;
use super::problem::Problems;

/// Keys of `admin`.
pub const KEYS: &[&str] = &[
    "listen",
    "ready_when_degraded",
    "ready_when_out_of_service",
    "liveness_stall",
    "max_connections",
    "header_read_timeout",
    "control",
    "grpc",
];
/// Keys of `admin.control`.
pub const CONTROL_KEYS: &[&str] = &["token_file", "max_ttl"];
/// Keys of `admin.grpc`.
pub const GRPC_KEYS: &[&str] = &["enabled", "max_watch_streams"];
/// Default cap on open gRPC health `Watch` streams.
pub const DEFAULT_MAX_WATCH_STREAMS: usize = 16;
/// Most `Watch` streams that may be configured.
pub const MAX_MAX_WATCH_STREAMS: usize = 1024;

/// Default admin listen address.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9901);
/// Default stall after which `/livez` fails.
pub const DEFAULT_LIVENESS_STALL: Duration = Duration::from_secs(10);
/// Default cap on open admin connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Most admin connections that may be configured.
pub const MAX_MAX_CONNECTIONS: usize = 4096;
/// Default time a client has to send a request head (and an idle keep-alive
/// connection may wait for its next one).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Default longest TTL of a drain, maintenance or dependency override.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest `max_ttl` that may be configured: an override is an incident tool,
/// not a configuration.
pub const MAX_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Admin server settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// `/readyz` answers 200 while degraded (default true).
    pub ready_when_degraded: bool,
    /// `/readyz` answers 200 while out of service (default false). Setting it
    /// keeps pods in the Service and lets healthgate answer 503 itself, so a
    /// shared outage does not empty the endpoints fleet-wide.
    pub ready_when_out_of_service: bool,
    /// `/livez` fails when an event loop has not ticked for this long.
    pub liveness_stall: Duration,
    /// Open admin connections; at the cap the oldest idle one is closed to
    /// admit a new one (a probe is always a new connection).
    pub max_connections: usize,
    /// Time to send a request head; also how long an idle keep-alive
    /// connection is kept.
    pub header_read_timeout: Duration,
    /// The runtime control API; `None` = the control endpoints do not exist.
    pub control: Option<ControlConfig>,
    /// The gRPC health service over h2c on the admin port.
    pub grpc: GrpcConfig,
}

/// `admin.grpc`: `grpc.health.v1.Health` over HTTP/2 prior knowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcConfig {
    /// Whether the admin port accepts HTTP/2 (default true); off, it speaks HTTP/1.1 only.
    pub enabled: bool,
    /// Open `Watch` streams at most; one more is refused `RESOURCE_EXHAUSTED`.
    pub max_watch_streams: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig { enabled: true, max_watch_streams: DEFAULT_MAX_WATCH_STREAMS }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_LISTEN,
            ready_when_degraded: true,
            ready_when_out_of_service: false,
            liveness_stall: DEFAULT_LIVENESS_STALL,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            control: None,
            grpc: GrpcConfig::default(),
        }
    }
}

/// The runtime control API (drain, maintenance, dependency overrides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// File holding the bearer token (a mounted Kubernetes Secret); read
    /// again whenever it changes.
    pub token_file: PathBuf,
    /// Longest TTL a caller may ask for.
    pub max_ttl: Duration,
}

/// Reads the `admin` section (absent: every default).
pub(super) fn admin(admin: Option<&Map<'_>>, p: &mut Problems) -> AdminConfig {
    let d = AdminConfig::default();
    let Some(a) = admin else { return d };
    a.deny_unknown(KEYS, p);
    let max_connections = match a.int::<usize>("max_connections", p) {
        Some(n) if n.value < 4 || n.value > MAX_MAX_CONNECTIONS => {
            p.at(n.pos, a.key("max_connections"), format!("must be between 4 and {MAX_MAX_CONNECTIONS}"));
            d.max_connections
        }
        Some(n) => n.value,
        None => d.max_connections,
    };
    let header_read_timeout = match a.duration("header_read_timeout", p) {
        Some(t) if t.value.is_zero() => {
            p.at(t.pos, a.key("header_read_timeout"), "must be more than 0");
            d.header_read_timeout
        }
        Some(t) => t.value,
        None => d.header_read_timeout,
    };
    AdminConfig {
        listen: a.str("listen", p).map(|l| listener::socket_addr(&l, &a.key("listen"), p)).unwrap_or(d.listen),
        ready_when_degraded: a.bool("ready_when_degraded", p).is_none_or(|b| b.value),
        ready_when_out_of_service: a.bool("ready_when_out_of_service", p).is_some_and(|b| b.value),
        liveness_stall: a.duration("liveness_stall", p).map_or(d.liveness_stall, |d| d.value),
        max_connections,
        header_read_timeout,
        control: a.map("control", p).and_then(|c| control(&c, p)),
        grpc: a.map("grpc", p).map_or_else(GrpcConfig::default, |g| grpc(&g, p)),
    }
}

/// Reads `admin.grpc`.
fn grpc(g: &Map<'_>, p: &mut Problems) -> GrpcConfig {
    g.deny_unknown(GRPC_KEYS, p);
    let d = GrpcConfig::default();
    let max_watch_streams = match g.int::<usize>("max_watch_streams", p) {
        Some(n) if n.value < 1 || n.value > MAX_MAX_WATCH_STREAMS => {
            p.at(n.pos, g.key("max_watch_streams"), format!("must be between 1 and {MAX_MAX_WATCH_STREAMS}"));
            d.max_watch_streams
        }
        Some(n) => n.value,
        None => d.max_watch_streams,
    };
    GrpcConfig { enabled: g.bool("enabled", p).is_none_or(|b| b.value), max_watch_streams }
}

/// Reads `admin.control`: the token file must hold a usable token now, so a
/// typo in the path is a config error rather than an API that rejects everyone.
fn control(c: &Map<'_>, p: &mut Problems) -> Option<ControlConfig> {
    c.deny_unknown(CONTROL_KEYS, p);
    let max_ttl = match c.duration("max_ttl", p) {
        Some(t) if t.value < Duration::from_secs(1) || t.value > MAX_MAX_TTL => {
            p.at(t.pos, c.key("max_ttl"), "must be between 1s and 7d");
            DEFAULT_MAX_TTL
        }
        Some(t) => t.value,
        None => DEFAULT_MAX_TTL,
    };
    if !c.has("token_file") {
        c.missing("token_file", p);
        return None;
    }
    let file = c.str("token_file", p)?;
    let token_file = PathBuf::from(&file.value);
    match read_token(&token_file) {
        Ok(_) => {}
        Err(e) => p.at(file.pos, c.key("token_file"), e.to_string()),
    }
    Some(ControlConfig { token_file, max_ttl })
}

/// Why a token file gives no usable token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read token file {}: {}", path.display(), kind)]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        kind: std::io::ErrorKind,
    },
    /// The token is too short to resist guessing.
    #[error("the token in {} is shorter than {MIN_TOKEN_LEN} characters", path.display())]
    TooShort {
        /// The file.
        path: PathBuf,
    },
}

/// Reads the control token from its file: surrounding whitespace (the
/// newline an editor or `kubectl create secret --from-file` leaves) is not
/// part of it.
pub fn read_token(path: &std::path::Path) -> Result<Vec<u8>, TokenError> {
    let raw = std::fs::read(path).map_err(|e| TokenError::Read { path: path.to_path_buf(), kind: e.kind() })?;
    let token = raw.trim_ascii().to_vec();
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort { path: path.to_path_buf() });
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError, Problem};
    use std::path::Path;
    use std::time::Duration;

    const MINIMAL: &str = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n";

    fn problems(yaml: &str) -> Vec<Problem> {
        match Config::from_yaml(yaml, Path::new("t.yaml")) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn without_a_control_block_the_control_api_is_off_and_limits_have_defaults() {
        let c = Config::from_yaml(MINIMAL, Path::new("t")).unwrap();
        assert!(c.admin.control.is_none());
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(c.admin.header_read_timeout, Duration::from_secs(3));
        assert_eq!(c.admin.grpc, super::GrpcConfig { enabled: true, max_watch_streams: 16 });
    }

    #[test]
    fn the_grpc_block_is_read_and_its_bounds_are_errors_at_their_keys() {
        let c = Config::from_yaml(
            &format!("admin:\n  grpc:\n    enabled: false\n    max_watch_streams: 3\n{MINIMAL}"),
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.admin.grpc, super::GrpcConfig { enabled: false, max_watch_streams: 3 });
        let p = problems(&format!("admin:\n  grpc:\n    max_watch_streams: 0\n    watches: 2\n{MINIMAL}"));
        let got: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(got, [("admin.grpc.max_watch_streams", 3), ("admin.grpc.watches", 4)], "{p:?}");
    }

    #[test]
    fn a_readable_token_file_turns_the_control_api_on() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        let yaml = format!(
            "admin:\n  max_connections: 16\n  control:\n    token_file: {}\n    max_ttl: 2h\n{MINIMAL}",
            f.display()
        );
        let c = Config::from_yaml(&yaml, Path::new("t")).unwrap();
        let control = c.admin.control.unwrap();
        assert_eq!((control.token_file, control.max_ttl), (f, Duration::from_secs(7200)));
        assert_eq!(c.admin.max_connections, 16);
        assert_eq!(super::read_token(&control_path(&yaml)).unwrap(), b"0123456789abcdef0123");
    }

    fn control_path(yaml: &str) -> std::path::PathBuf {
        Config::from_yaml(yaml, Path::new("t")).unwrap().admin.control.unwrap().token_file
    }

    #[test]
    fn a_missing_or_short_token_and_a_typo_are_errors_at_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let p =
            problems(&format!("admin:\n  control:\n    token_file: {}\n    max_tl: 1h\n{MINIMAL}", short.display()));
        let got: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.message.as_str())).collect();
        assert_eq!(got[0].0, "admin.control.token_file");
        assert!(got[0].1.contains("shorter than 16"), "{p:?}");
        assert_eq!(got[1], ("admin.control.max_tl", "unknown field `max_tl`, did you mean `max_ttl`?"));
        let p = problems(&format!("admin:\n  control:\n    token_file: {}/nope\n{MINIMAL}", dir.path().display()));
        assert!(p[0].message.contains("cannot read token file"), "{p:?}");
        let p = problems(&format!("admin:\n  control: {{}}\n  max_connections: 1\n{MINIMAL}"));
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["admin.control.token_file", "admin.max_connections"], "{p:?}");
    }
}
