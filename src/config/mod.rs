//! Configuration, the bottom layer: the YAML schema, read and validated once
//! at load into the typed [`Config`] the rest of the program uses. Nothing
//! outside this module sees YAML or file positions; the checks receive
//! finished, typed settings.
//!
//! Layout:
//! * `node`: the raw schema, the file as a tree in which every key and value
//!   keeps its line and column, with typed readers;
//! * `problem`: positions, [`Problem`] and the collector;
//! * `admin`: the admin server, its limits and the control API settings;
//! * `listener`, `route`: listeners and route configuration (the compiled
//!   route table is `crate::routes`, which builds on this);
//! * `dependency`: the keys every dependency has, and one module per `type`
//!   with its settings, keys, defaults, parsing and tests;
//! * `hostport`, `secret`: small value types any layer may use.
//!
//! Every mistake of a file is reported in one run: an unknown key (with the
//! closest valid key when there is a near miss), a value of the wrong type,
//! an invalid value (with the closest valid keyword), a missing key, a
//! contradiction between keys. Each names the file, line, column and key
//! path. Only a YAML syntax error stops reading, since nothing after it has a
//! reliable meaning.

pub mod admin;
pub mod dependency;
pub mod fleet;
pub mod hostport;
pub mod listener;
pub mod node;
pub mod problem;
pub mod reload;
pub mod route;
pub mod secret;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use admin::{AdminConfig, ControlConfig, TokenError, read_token};
pub use dependency::amqp::{AmqpNode, AmqpSettings, Require};
pub use dependency::http::HttpSettings;
pub use dependency::mysql::{GaleraMode, MysqlSettings};
pub use dependency::postgres::PostgresSettings;
pub use dependency::redis::{RedisSettings, SentinelSettings, Target};
pub use dependency::tcp::TcpSettings;
pub use dependency::tls::TlsSettings;
pub use dependency::{DependencyConfig, DependencyKind, Impact, MAX_DEPENDENCIES};
pub use fleet::{FleetConfig, FleetReadiness, PeerSource, SlowStart};
pub use hostport::{HostPort, HostPortError};
pub use listener::{
    HttpListenerConfig, ListenerConfig, ListenerProtocol, TcpListenerConfig, TcpOnOutage, TcpReject, UpstreamProtocol,
};
pub use node::MAX_DURATION;
pub use problem::{At, Pos, Problem};
pub use reload::ReloadConfig;
pub use route::{HeaderMatch, RouteConfig, RouteMatch};
pub use secret::{Secret, SecretError, SecretSource};

use node::Map;
use problem::Problems;

/// Top-level keys.
const KEYS: &[&str] = &["workers", "admin", "drain", "short_circuit", "listeners", "dependencies", "reload", "fleet"];
/// Keys of `drain`.
const DRAIN_KEYS: &[&str] = &["delay", "timeout"];
/// Keys of `short_circuit`.
const SHORT_CIRCUIT_KEYS: &[&str] = &[
    "retry_after",
    "retry_after_spread",
    "expose_dependencies",
    "out_of_service_body",
    "degraded_body",
    "maintenance_body",
    "grpc",
];
/// Keys of `short_circuit.grpc`.
const GRPC_KEYS: &[&str] = &["out_of_service_status", "degraded_status"];

/// The gRPC status names a short-circuit may answer with, and their codes
/// (`OK` is not one: a short-circuit is an error).
pub const GRPC_STATUS_CHOICES: &[(&str, u8)] = &[
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];
/// Default gRPC status of a short-circuited gRPC call (both impacts): UNAVAILABLE.
pub const DEFAULT_GRPC_SHORT_CIRCUIT_STATUS: u8 = 14;

/// Most data-plane worker threads.
pub const MAX_WORKERS: usize = 256;
/// Default admin listen address.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = admin::DEFAULT_LISTEN;
/// Default stall after which `/livez` fails.
pub const DEFAULT_LIVENESS_STALL: Duration = admin::DEFAULT_LIVENESS_STALL;
/// Default time to keep serving after SIGTERM while readiness is already 503.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Default time to wait for in-flight requests after the delay.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Default `Retry-After` of 503 responses.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Longest `retry_after_spread` honoured (longer values are capped).
pub const MAX_RETRY_AFTER_SPREAD: Duration = Duration::from_secs(300);

// === Errors ===

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{}:{}:{}: {}: {}", path.display(), p.line, p.column, p.key, p.message));
    }
    out
}

// === The validated config ===
/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Data-plane worker threads.
    pub workers: usize,
    /// The admin server (probes, status, metrics).
    pub admin: AdminConfig,
    /// Graceful shutdown timing.
    pub drain: DrainConfig,
    /// The short-circuit responses.
    pub short_circuit: ShortCircuitConfig,
    /// Inbound listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Backing services to check.
    pub dependencies: Vec<DependencyConfig>,
    /// How a changed file is noticed.
    pub reload: ReloadConfig,
    /// Hash of the file's text ([`reload::hash`]): which config is in force.
    pub hash: u64,
    /// Peers and the fleet readiness policy (`None`: this pod decides alone).
    pub fleet: Option<FleetConfig>,
}

/// Graceful shutdown settings (see README "Reliability").
#[derive(Debug, Clone, PartialEq, Copy)]
pub struct DrainConfig {
    /// After SIGTERM, keep serving this long while readiness is already 503.
    pub delay: Duration,
    /// Then wait this long for in-flight requests and connections.
    pub timeout: Duration,
}

/// What a short-circuited request receives.
#[derive(Debug, Clone, PartialEq)]
pub struct ShortCircuitConfig {
    /// `Retry-After` on 503 responses (whole seconds).
    pub retry_after: Duration,
    /// Each 503's `Retry-After` is `retry_after` plus a random whole number
    /// of seconds up to this, so rejected clients do not come back together.
    pub retry_after_spread: Duration,
    /// Add the names of the missing dependencies to the problem body.
    pub expose_dependencies: bool,
    /// Body of the 503 (out of service / starting) response.
    pub out_of_service_body: String,
    /// Body of the 500 (degraded) response.
    pub degraded_body: String,
    /// Body of the 503 every gated request gets while the pod is in maintenance.
    pub maintenance_body: String,
    /// gRPC status of a gRPC call short-circuited out of service (and in maintenance).
    pub grpc_out_of_service_status: u8,
    /// gRPC status of a gRPC call short-circuited while degraded.
    pub grpc_degraded_status: u8,
}

/// The default 503 problem+json body (its `cause` names the state).
pub const DEFAULT_OUT_OF_SERVICE_BODY: &str =
    r#"{"type":"about:blank","title":"Service Unavailable","status":503,"cause":"OUT OF SERVICE"}"#;
/// The default body of the 503 answered during maintenance.
pub const DEFAULT_MAINTENANCE_BODY: &str =
    r#"{"type":"about:blank","title":"Service Unavailable","status":503,"cause":"MAINTENANCE"}"#;
/// The default 500 problem+json body.
pub const DEFAULT_DEGRADED_BODY: &str =
    r#"{"type":"about:blank","title":"Internal Server Error","status":500,"cause":"Internal Server Error"}"#;

// === Loading ===

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_yaml(&text, path)
    }

    /// Validates config text; `path` is only used in messages. Every problem
    /// of the text is reported, in file order.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
        let tree = node::parse(text).map_err(|(message, pos)| invalid(vec![yaml_problem(&message, pos, text)]))?;
        let mut problems = Problems::default();
        let config = tree.map("", &mut problems).map(|m| parse(&m, path, &mut problems));
        match config {
            Some(config) if problems.count() == 0 => Ok(Config { hash: reload::hash(text), ..config }),
            _ => Err(invalid(problems.into_sorted())),
        }
    }

    /// The hash as `/status`, the logs and `healthgate validate` show it.
    pub fn hash_hex(&self) -> String {
        format!("{:014x}", self.hash)
    }

    /// Index of a dependency by name.
    pub fn dependency_index(&self, name: &str) -> Option<usize> {
        self.dependencies.iter().position(|d| d.name == name)
    }
}

/// Turns a YAML syntax error message into a [`Problem`], naming the key
/// written on its line when there is one.
fn yaml_problem(message: &str, pos: Pos, text: &str) -> Problem {
    // saphyr says "error: line L column C: <message> at line L, column C"; keep the message.
    let mut m = message.trim();
    if let Some(rest) = m.strip_prefix("error: ") {
        m = rest.split_once(": ").filter(|(pos, _)| pos.starts_with("line ")).map(|(_, r)| r).unwrap_or(rest);
    }
    if let Some(i) = m.rfind(" at line ") {
        m = &m[..i];
    }
    let key = key_on_line(text, pos.0).unwrap_or_else(|| "(yaml)".into());
    // A problem always has a position, even when the parser gave none.
    let pos = Pos(pos.0.max(1), pos.1.max(1));
    Problem { line: pos.0, column: pos.1, key, message: m.to_string() }
}

/// The mapping key written on a line (`  rise: x` → `rise`), if any.
fn key_on_line(text: &str, line: u64) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)? as usize)?;
    let (k, _) = l.split_once(':')?;
    let k = k.trim().trim_start_matches("- ").trim().trim_matches(['"', '\'']);
    (!k.is_empty() && !k.contains(' ')).then(|| k.to_string())
}

/// Reads the whole config from the top-level mapping.
fn parse(top: &Map<'_>, path: &Path, p: &mut Problems) -> Config {
    top.deny_unknown(KEYS, p);
    let workers = match top.int::<usize>("workers", p) {
        Some(w) if w.value == 0 || w.value > MAX_WORKERS => {
            p.at(w.pos, "workers", format!("must be between 1 and {MAX_WORKERS}"));
            1
        }
        Some(w) => w.value,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let section = |k: &str, keys: &[&str], p: &mut Problems| {
        let m = top.map(k, p);
        if let Some(m) = &m {
            m.deny_unknown(keys, p);
        }
        m
    };

    let admin = admin::admin(top.map("admin", p).as_ref(), p);

    let drain = section("drain", DRAIN_KEYS, p);
    let drain = DrainConfig {
        delay: drain.as_ref().and_then(|d| d.duration("delay", p)).map_or(DEFAULT_DRAIN_DELAY, |d| d.value),
        timeout: drain.as_ref().and_then(|d| d.duration("timeout", p)).map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.value),
    };

    let sc = section("short_circuit", SHORT_CIRCUIT_KEYS, p);
    let short_circuit = ShortCircuitConfig {
        retry_after: sc.as_ref().and_then(|s| s.duration("retry_after", p)).map_or(DEFAULT_RETRY_AFTER, |d| d.value),
        retry_after_spread: sc
            .as_ref()
            .and_then(|s| s.duration("retry_after_spread", p))
            .map_or(Duration::ZERO, |d| d.value.min(MAX_RETRY_AFTER_SPREAD)),
        expose_dependencies: sc.as_ref().and_then(|s| s.bool("expose_dependencies", p)).is_some_and(|b| b.value),
        out_of_service_body: sc
            .as_ref()
            .and_then(|s| route::problem_body(s, "out_of_service_body", p))
            .unwrap_or_else(|| DEFAULT_OUT_OF_SERVICE_BODY.to_string()),
        degraded_body: sc
            .as_ref()
            .and_then(|s| route::problem_body(s, "degraded_body", p))
            .unwrap_or_else(|| DEFAULT_DEGRADED_BODY.to_string()),
        maintenance_body: sc
            .as_ref()
            .and_then(|s| route::problem_body(s, "maintenance_body", p))
            .unwrap_or_else(|| DEFAULT_MAINTENANCE_BODY.to_string()),
        grpc_out_of_service_status: DEFAULT_GRPC_SHORT_CIRCUIT_STATUS,
        grpc_degraded_status: DEFAULT_GRPC_SHORT_CIRCUIT_STATUS,
    };
    let mut short_circuit = short_circuit;
    if let Some(g) = sc.as_ref().and_then(|s| s.map("grpc", p)) {
        g.deny_unknown(GRPC_KEYS, p);
        if let Some(v) = g.choice("out_of_service_status", GRPC_STATUS_CHOICES, p) {
            short_circuit.grpc_out_of_service_status = v.value;
        }
        if let Some(v) = g.choice("degraded_status", GRPC_STATUS_CHOICES, p) {
            short_circuit.grpc_degraded_status = v.value;
        }
    }

    let (dependencies, declared) = dependency::dependencies(top.get("dependencies"), p);
    let listeners = listener::listeners(top.get("listeners"), &declared, p);
    if listeners.is_empty() {
        p.at(top.get("listeners").map_or(Pos(1, 1), |l| l.pos), "listeners", "at least one listener is required");
    }

    let reload = reload::reload(top.map("reload", p).as_ref(), p);
    let fleet = top.map("fleet", p).and_then(|f| fleet::fleet(&f, admin.listen.port(), p));
    Config {
        path: path.to_path_buf(),
        workers,
        admin,
        drain,
        short_circuit,
        listeners,
        dependencies,
        reload,
        fleet,
        hash: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, Path::new("test.yaml"))
    }

    fn problems(yaml: &str) -> Vec<Problem> {
        match load(yaml) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Ok(_) => panic!("config unexpectedly valid"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    const MINIMAL: &str = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n";

    #[test]
    fn a_key_of_the_other_listener_protocol_is_an_error_at_its_line() {
        let p = problems(&format!("{MINIMAL}    reject: reset\n    idle_timeout: 5m\n"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].key.as_str(), p[0].line), ("listeners[0].reject", 5), "{p:?}");
        assert!(p[0].message.contains("protocol: tcp"), "{p:?}");
        let p = problems(
            "listeners:\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n    \
             bypass: [/healthz]\n    max_body_bytes: 10\n    idle_timeout: 5m\n",
        );
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["listeners[0].bypass", "listeners[0].max_body_bytes"], "{p:?}");
    }

    #[test]
    fn http2_and_grpc_settings_load_and_mistakes_are_errors_at_their_keys() {
        let c = Config::from_yaml(
            &format!(
                "short_circuit:\n  grpc:\n    degraded_status: RESOURCE_EXHAUSTED\n{MINIMAL}    upstream_protocol: h2c\n    \
                 http2_max_concurrent_streams: 8\n"
            ),
            Path::new("t"),
        )
        .unwrap();
        let l = &c.listeners[0].http;
        assert_eq!(l.upstream_protocol, UpstreamProtocol::H2c);
        assert_eq!((l.http2, l.http2_max_concurrent_streams), (true, 8));
        assert_eq!(l.http2_max_header_list_size as usize, l.max_header_bytes, "defaults to max_header_bytes");
        assert_eq!((c.short_circuit.grpc_out_of_service_status, c.short_circuit.grpc_degraded_status), (14, 8));
        // OK is no short-circuit status; `h2` is no upstream protocol.
        let p = problems(&format!(
            "short_circuit:\n  grpc:\n    out_of_service_status: OK\n{MINIMAL}    upstream_protocol: h2\n"
        ));
        let keys: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            keys,
            [("short_circuit.grpc.out_of_service_status", 3), ("listeners[0].upstream_protocol", 8)],
            "{p:?}"
        );
        assert!(p[1].message.contains("h2c"), "the near miss is suggested: {p:?}");
        // An h2c app behind a TCP listener can never be spoken to in HTTP/2.
        let p = problems(
            "listeners:\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n    \
             upstream_protocol: h2c\n",
        );
        assert_eq!(
            p.iter().map(|p| (p.key.as_str(), p.line)).collect::<Vec<_>>(),
            [("listeners[0].upstream_protocol", 6)]
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = Config::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"))).expect("config.yaml");
        assert!(!c.listeners.is_empty());
    }

    #[test]
    fn a_config_with_listeners_routes_drain_and_two_dependency_types_loads_with_its_values() {
        let yaml = r#"
workers: 2
admin:
  listen: "0.0.0.0:9901"
drain:
  delay: 5s
  timeout: 20s
listeners:
  - name: web
    protocol: http
    listen: "0.0.0.0:8080"
    upstream: "127.0.0.1:3000"
    bypass: ["/healthz"]
dependencies:
  - name: db
    type: tcp
    address: "mysql:3306"
    impact: out_of_service
    interval: 2s
    timeout: 1s
    rise: 2
    fall: 2
  - name: search
    type: http
    url: "http://search:9200/_cluster/health"
    expect_status: [200]
    impact: degraded
"#;
        let c = load(yaml).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.drain.delay, Duration::from_secs(5));
        assert_eq!(c.dependencies.len(), 2);
        assert_eq!(c.dependencies[0].impact, Impact::OutOfService);
        assert_eq!(c.dependencies[1].impact, Impact::Degraded);
        assert_eq!(c.listeners[0].needs, vec![0, 1]);
        assert_eq!(c.listeners[0].bypass, vec!["/healthz".to_string()]);
    }

    #[test]
    fn unknown_key_is_reported_with_line_and_column() {
        let p = problems(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n    bogus: 1\n",
        );
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("unknown field `bogus`"), "{:?}", p[0]);
        assert!(p[0].line >= 2, "{:?}", p[0]);
    }

    #[test]
    fn key_of_another_dependency_type_is_reported_at_its_line() {
        let yaml =
            format!("{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: db:1\n    url: http://x/\n");
        let p = problems(&yaml);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].line, p[0].key.as_str()), (9, "dependencies[0].url"));
    }

    #[test]
    fn all_semantic_errors_are_reported_at_once() {
        // A value of the wrong form (`interval: fast`) no longer hides the others.
        let yaml = format!(
            "{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: nohost\n    rise: 0\n  - name: db\n    type: tcp\n    address: a:1\n    interval: fast\n"
        );
        let p = problems(&yaml);
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["dependencies[0].address", "dependencies[0].rise", "dependencies[1].name", "dependencies[1].interval"],
            "{p:?}"
        );
        let yaml = format!(
            "{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: nohost\n    rise: 0\n  - name: db\n    type: tcp\n    address: a:1\n"
        );
        let p = problems(&yaml);
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["dependencies[0].address", "dependencies[0].rise", "dependencies[1].name"], "{p:?}");
    }

    #[test]
    fn five_mistakes_of_different_kinds_are_five_problems_with_positions() {
        let yaml = "workers: two\nlisteners:\n  - name: web\n    protocol: htp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n    bypas: [/healthz]\ndependencies:\n  - name: db\n    type: tcp\n    adress: db:3306\n    address: db:3306\n    interval: 2 parsecs\n";
        let p = problems(yaml);
        let got: Vec<_> = p.iter().map(|p| (p.line, p.column, p.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (1, 10, "workers"),
                (4, 15, "listeners[0].protocol"),
                (7, 5, "listeners[0].bypas"),
                (11, 5, "dependencies[0].adress"),
                (13, 15, "dependencies[0].interval"),
            ],
            "{p:?}"
        );
        assert_eq!(p[0].message, "expected a whole number, found the string \"two\"");
        assert!(p[1].message.contains("did you mean `http`?"), "{p:?}");
        assert_eq!(p[2].message, "unknown field `bypas`, did you mean `bypass`?");
        assert_eq!(p[3].message, "unknown field `adress`, did you mean `address`?");
        assert!(p[4].message.contains("invalid duration"), "{p:?}");
    }

    #[test]
    fn a_near_miss_key_and_a_near_miss_value_suggest_the_valid_one() {
        let p = problems(&format!(
            "{MINIMAL}    max_conections: 5\ndependencies:\n  - name: db\n    type: tpc\n    address: a:1\n    impact: degradd\n"
        ));
        let messages: Vec<_> = p.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages[0], "unknown field `max_conections`, did you mean `max_connections`?");
        assert!(messages[1].starts_with("unknown dependency type \"tpc\", did you mean `tcp`?"), "{p:?}");
        assert!(messages[2].starts_with("unknown value \"degradd\", did you mean `degraded`?"), "{p:?}");
    }

    #[test]
    fn a_key_written_twice_is_reported_at_the_second() {
        let p = problems(&format!("{MINIMAL}    upstream: 127.0.0.1:3001\n"));
        assert_eq!((p[0].line, p[0].key.as_str()), (5, "listeners[0].upstream"), "{p:?}");
        assert!(p[0].message.contains("duplicate key"), "{p:?}");
    }

    #[test]
    fn a_dependency_with_problems_still_satisfies_needs_by_name() {
        let p = problems(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n    needs: [db]\ndependencies:\n  - name: db\n    type: tcp\n",
        );
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["dependencies[0].address"], "{p:?}");
    }

    #[test]
    fn rendered_error_names_file_line_column_and_key() {
        let err =
            load(&format!("{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: a:1\n    rise: 0\n"))
                .unwrap_err();
        assert_eq!(err.to_string(), "test.yaml:9:11: dependencies[0].rise: must be between 1 and 100");
    }

    #[test]
    fn durations_are_human_strings() {
        let c = load(&format!("{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: a:1\n    interval: 500ms\n    timeout: 1m\n")).unwrap();
        assert_eq!(c.dependencies[0].interval, Duration::from_millis(500));
        assert_eq!(c.dependencies[0].timeout, Duration::from_secs(60));
        assert_eq!(c.dependencies[0].interval_down, Duration::from_millis(500));
    }

    #[test]
    fn absurdly_long_duration_is_refused_not_overflowed() {
        let p = problems(&format!(
            "{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: a:1\n    timeout: 1000000y\n"
        ));
        assert!(p[0].message.contains("too long"), "{p:?}");
    }

    #[test]
    fn bad_duration_is_an_error_at_its_line() {
        let p = problems(&format!(
            "{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: a:1\n    interval: soon\n"
        ));
        assert!(p[0].message.contains("invalid duration"), "{p:?}");
    }

    #[test]
    fn unknown_dependency_in_needs_is_an_error() {
        let yaml =
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n    needs: [nope]\n";
        let p = problems(yaml);
        assert_eq!((p[0].line, p[0].key.as_str()), (5, "listeners[0].needs"));
    }

    const TWO_DEPS: &str = "dependencies:\n  - name: db\n    type: tcp\n    address: a:1\n  - name: cache\n    type: tcp\n    address: b:1\n    impact: degraded\n";

    fn with_routes(routes: &str) -> String {
        format!(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n    bypass: [/healthz]\n    routes:\n{routes}{TWO_DEPS}"
        )
    }

    #[test]
    fn routes_are_parsed_with_needs_and_bypass_comes_first() {
        let c = load(&with_routes(
            "      - name: cart\n        match: { path_prefix: /cart }\n        needs: [db, cache]\n      - name: static\n        match: { path_prefix: /static }\n        needs: []\n      - name: reports\n        match: { path_prefix: /api/reports, methods: [GET] }\n        needs: [db]\n",
        ))
        .unwrap();
        let r = &c.listeners[0].routes;
        let names: Vec<_> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["bypass", "cart", "static", "reports"]);
        assert!(r[0].bypass && r[0].needs.is_empty());
        assert_eq!(r[1].needs, vec![0, 1]);
        assert_eq!(r[3].matcher.methods, vec!["GET".to_string()]);
    }

    #[test]
    fn a_route_naming_an_unknown_dependency_is_an_error_at_its_line() {
        let p = problems(&with_routes(
            "      - name: cart\n        match: { path_prefix: /cart }\n        needs: [db, redis]\n",
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].line, p[0].key.as_str()), (9, "listeners[0].routes[0].needs"));
        assert!(p[0].message.contains("unknown dependency \"redis\""));
    }

    #[test]
    fn a_shadowed_route_and_a_duplicate_name_are_errors() {
        let p = problems(&with_routes(
            "      - name: api\n        match: { path_prefix: /api }\n      - name: reports\n        match: { path_prefix: /api/reports }\n      - name: api\n        match: { path_prefix: /other }\n",
        ));
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].line, 9);
        assert!(p[0].message.contains("route \"reports\" is unreachable: route \"api\" at line 7"), "{p:?}");
        assert!(p[1].message.contains("duplicate route name"), "{p:?}");
    }

    #[test]
    fn a_route_under_a_bypass_prefix_is_unreachable() {
        let p = problems(&with_routes("      - name: hz\n        match: { path_prefix: /healthz/deep }\n"));
        assert!(p[0].message.contains("unreachable: a bypass prefix"), "{p:?}");
    }

    #[test]
    fn observe_dependencies_are_not_needed_by_default() {
        let c = load(&format!("{MINIMAL}dependencies:\n  - name: a\n    type: tcp\n    address: a:1\n    impact: observe\n  - name: b\n    type: tcp\n    address: b:1\n")).unwrap();
        assert_eq!(c.listeners[0].needs, vec![1]);
    }
}
