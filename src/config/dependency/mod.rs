//! Dependency configuration: the keys every dependency has, and one module
//! per `type` owning that type's settings, keys, defaults and parsing.
//!
//! Adding a dependency type takes one file here (a settings struct that
//! implements [`DependencyType`]), one check module in `crate::check`, and
//! one line in each of the two enums: [`DependencyKind`] below and
//! `crate::check::AnyCheck`. The `type` keyword, its aliases, the allowed
//! keys and the parser are found through the trait, so nothing else lists
//! the types.

pub mod amqp;
pub mod http;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod tcp;
pub mod tls;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use super::hostport::HostPort;
use super::node::{Map, Node, Value, unknown_key, unknown_value};
use super::problem::{Pos, Problems, is_name};
use super::secret::SecretSource;

/// Most dependencies one process checks: the state is a 64-bit mask whose
/// top bit is the maintenance switch.
pub const MAX_DEPENDENCIES: usize = 63;
/// Default time between checks.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default bound on one whole check.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive successes to go up.
pub const DEFAULT_RISE: u32 = 2;
/// Default consecutive failures to go down.
pub const DEFAULT_FALL: u32 = 2;
/// Highest `rise` and `fall` accepted.
pub const MAX_RISE_FALL: u32 = 100;
/// Default random spread of each interval (±10 %).
pub const DEFAULT_JITTER: f64 = 0.1;
/// Highest `jitter` accepted.
pub const MAX_JITTER: f64 = 0.5;

/// Keys every dependency has, whatever its type.
const COMMON_KEYS: &[&str] =
    &["name", "type", "impact", "interval", "interval_down", "timeout", "rise", "fall", "jitter", "slow_start"];
/// The characters a dependency name may use besides letters and digits.
const NAME_CHARS: &[char] = &['_', '-', '.'];

/// How a dependency's outage affects the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Impact {
    /// Down → service out of service (503).
    OutOfService,
    /// Down → service degraded (500).
    Degraded,
    /// Checked and reported, never gates traffic.
    Observe,
}

impl Impact {
    /// Every impact, as written in the config.
    const CHOICES: &[(&str, Impact)] =
        &[("out_of_service", Impact::OutOfService), ("degraded", Impact::Degraded), ("observe", Impact::Observe)];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Impact::OutOfService => "out_of_service",
            Impact::Degraded => "degraded",
            Impact::Observe => "observe",
        }
    }
}

/// One checked dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct DependencyConfig {
    /// Unique name (a metric label).
    pub name: String,
    /// Impact of an outage.
    pub impact: Impact,
    /// Time between checks while up (and while unknown).
    pub interval: Duration,
    /// Time between checks while down.
    pub interval_down: Duration,
    /// Bound on one whole check, every step included.
    pub timeout: Duration,
    /// Consecutive successes to go up.
    pub rise: u32,
    /// Consecutive failures to go down.
    pub fall: u32,
    /// Random spread applied to each interval, as a fraction (0.1 = ±10 %).
    pub jitter: f64,
    /// Herd-safe recovery: after the dependency comes back up, the share of
    /// requests needing it that are admitted ramps up over a window.
    pub slow_start: Option<super::fleet::SlowStart>,
    /// Protocol-specific settings.
    pub kind: DependencyKind,
}

/// One dependency type: its keywords, keys and parser.
pub trait DependencyType: Sized {
    /// The `type` keyword (also the `type` metric label).
    const NAME: &'static str;
    /// Other keywords accepted for `type` (`mariadb` for `mysql`).
    const ALIASES: &'static [&'static str] = &[];
    /// Keys of this type besides the common ones and the TLS keys.
    const KEYS: &'static [&'static str];
    /// Impact when `impact` is not written.
    const DEFAULT_IMPACT: Impact = Impact::OutOfService;

    /// Reads the type's settings from the dependency's mapping, recording
    /// every problem; `None` when any problem was recorded.
    fn parse(d: &Map<'_>, p: &mut Problems) -> Option<Self>;
}

/// A type's entry in the table the generic code searches.
struct TypeEntry {
    name: &'static str,
    aliases: &'static [&'static str],
    keys: &'static [&'static str],
    default_impact: Impact,
    parse: fn(&Map<'_>, &mut Problems) -> Option<DependencyKind>,
}

/// Declares [`DependencyKind`] and the table of types from one line per type.
macro_rules! dependency_types {
    ($($(#[$doc:meta])* $variant:ident($settings:ty),)*) => {
        /// Protocol-specific settings of a dependency.
        #[derive(Debug, Clone, PartialEq)]
        pub enum DependencyKind {
            $($(#[$doc])* $variant($settings),)*
        }

        impl DependencyKind {
            /// The `type` label.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(DependencyKind::$variant(_) => <$settings as DependencyType>::NAME,)*
                }
            }
        }

        /// Every dependency type.
        const TYPES: &[TypeEntry] = &[$(TypeEntry {
            name: <$settings as DependencyType>::NAME,
            aliases: <$settings as DependencyType>::ALIASES,
            keys: <$settings as DependencyType>::KEYS,
            default_impact: <$settings as DependencyType>::DEFAULT_IMPACT,
            parse: |d, p| <$settings as DependencyType>::parse(d, p).map(DependencyKind::$variant),
        },)*];
    };
}

dependency_types! {
    /// Plain TCP connect (optional send/expect).
    Tcp(tcp::TcpSettings),
    /// HTTP GET.
    Http(http::HttpSettings),
    /// MySQL / MariaDB.
    Mysql(mysql::MysqlSettings),
    /// PostgreSQL.
    Postgres(postgres::PostgresSettings),
    /// Redis.
    Redis(redis::RedisSettings),
    /// RabbitMQ (AMQP 0-9-1).
    Amqp(amqp::AmqpSettings),
}

/// A dependency as far as listeners and routes need it: its name and impact,
/// known even when its settings have problems (so a `needs:` naming it is not
/// reported as well).
#[derive(Debug, Clone)]
pub struct Declared {
    /// The name.
    pub name: String,
    /// The impact.
    pub impact: Impact,
}

/// Reads the `dependencies` list: the valid dependencies, and every named one.
pub(super) fn dependencies(node: Option<&Node>, p: &mut Problems) -> (Vec<DependencyConfig>, Vec<Declared>) {
    let items = node.and_then(|n| n.seq("dependencies", p)).unwrap_or_default();
    let mut deps = Vec::new();
    let mut declared = Vec::new();
    let mut names = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let Some(d) = item.map(&format!("dependencies[{i}]"), p) else { continue };
        // Only a name written as a string can clash; any other type is reported once, below.
        if let Some(Node { value: Value::Str(name), pos }) = d.get("name")
            && !names.insert(name.clone())
        {
            p.at(*pos, d.key("name"), format!("duplicate dependency name {name:?}"));
        }
        let (dep, decl) = dependency(&d, p);
        declared.extend(decl);
        deps.extend(dep);
    }
    if deps.len() > MAX_DEPENDENCIES {
        p.at(node.map_or(Pos(1, 1), |n| n.pos), "dependencies", format!("at most {MAX_DEPENDENCIES} dependencies"));
    }
    (deps, declared)
}

/// Reads one dependency.
fn dependency(d: &Map<'_>, p: &mut Problems) -> (Option<DependencyConfig>, Option<Declared>) {
    let before = p.count();
    let name = d.required_str("name", p);
    if let Some(name) = name.as_ref().filter(|n| !is_name(&n.value, NAME_CHARS)) {
        p.at(name.pos, d.key("name"), "must be non-empty and use only letters, digits, '_', '-' and '.'");
    }
    let names = || TYPES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ");
    let kind = match d.str("type", p) {
        None if !d.has("type") => {
            p.at(d.pos, d.key("type"), format!("missing key `type` ({})", names()));
            None
        }
        None => None,
        Some(t) => {
            let found = TYPES.iter().find(|e| e.name == t.value || e.aliases.contains(&t.value.as_str()));
            if found.is_none() {
                let all: Vec<&str> =
                    TYPES.iter().flat_map(|e| std::iter::once(e.name).chain(e.aliases.iter().copied())).collect();
                p.at(t.pos, d.key("type"), unknown_value("dependency type", &t.value, &all));
            }
            found
        }
    };
    check_keys(d, kind, p);

    let impact = d.choice("impact", Impact::CHOICES, p).map(|i| i.value);
    let impact = impact.unwrap_or(kind.map_or(Impact::OutOfService, |k| k.default_impact));
    let duration = |k: &str, p: &mut Problems| {
        let v = d.duration(k, p)?;
        if v.value.is_zero() {
            p.at(v.pos, d.key(k), "must be greater than zero");
        }
        Some(v.value)
    };
    let interval = duration("interval", p).unwrap_or(DEFAULT_INTERVAL);
    let interval_down = duration("interval_down", p).unwrap_or(interval);
    let timeout = duration("timeout", p).unwrap_or(DEFAULT_TIMEOUT);
    let count = |k: &str, default: u32, p: &mut Problems| match d.int::<u32>(k, p) {
        Some(v) if v.value == 0 || v.value > MAX_RISE_FALL => {
            p.at(v.pos, d.key(k), format!("must be between 1 and {MAX_RISE_FALL}"));
            default
        }
        Some(v) => v.value,
        None => default,
    };
    let rise = count("rise", DEFAULT_RISE, p);
    let fall = count("fall", DEFAULT_FALL, p);
    let jitter = match d.float("jitter", p) {
        Some(j) if !(0.0..=MAX_JITTER).contains(&j.value) => {
            p.at(j.pos, d.key("jitter"), format!("must be between 0.0 and {MAX_JITTER}"));
            DEFAULT_JITTER
        }
        Some(j) => j.value,
        None => DEFAULT_JITTER,
    };
    let slow_start = d.map("slow_start", p).and_then(|m| super::fleet::slow_start(&m, p));
    let settings = kind.and_then(|k| (k.parse)(d, p));

    let declared = name.map(|n| Declared { name: n.value, impact });
    let dep = match (&declared, settings) {
        (Some(decl), Some(kind)) if p.count() == before => Some(DependencyConfig {
            name: decl.name.clone(),
            impact,
            interval,
            interval_down,
            timeout,
            rise,
            fall,
            jitter,
            slow_start,
            kind,
        }),
        _ => None,
    };
    (dep, declared)
}

/// Reports every key the dependency's type does not have: a key of another
/// type at its own line (it would otherwise be silently ignored), an unknown
/// key with the closest valid one.
fn check_keys(d: &Map<'_>, kind: Option<&TypeEntry>, p: &mut Problems) {
    let valid: Vec<&str> = match kind {
        Some(k) => [COMMON_KEYS, tls::KEYS, k.keys].concat(),
        None => [COMMON_KEYS, tls::KEYS].into_iter().chain(TYPES.iter().map(|t| t.keys)).flatten().copied().collect(),
    };
    for k in d.keys() {
        let key = k.value.as_str();
        if valid.contains(&key) {
            continue;
        }
        match (kind, TYPES.iter().any(|t| t.keys.contains(&key))) {
            (Some(t), true) => {
                p.at(k.pos, d.key(key), format!("`{key}` is not a setting of a `{}` dependency", t.name))
            }
            _ => p.at(k.pos, d.key(key), unknown_key(key, &valid)),
        }
    }
}

/// Reads a required `host:port` (or `host` with a default port).
pub(crate) fn host_port(d: &Map<'_>, k: &str, default_port: Option<u16>, p: &mut Problems) -> Option<HostPort> {
    let v = d.required_str(k, p)?;
    parse_host_port(&v.value, v.pos, &d.key(k), default_port, p)
}

/// Parses a `host:port`, recording a problem at `pos` when it is not one.
pub(crate) fn parse_host_port(
    s: &str,
    pos: Pos,
    key: &str,
    default_port: Option<u16>,
    p: &mut Problems,
) -> Option<HostPort> {
    HostPort::parse(s, default_port).map_err(|e| p.at(pos, key, e.to_string())).ok()
}

/// Reads a password source from the `password_env` / `password_file` keys of a mapping.
pub(crate) fn secret_source(d: &Map<'_>, p: &mut Problems) -> Option<SecretSource> {
    let key = d.key("password_env");
    match (d.str("password_env", p), d.str("password_file", p)) {
        (Some(e), Some(_)) => {
            p.at(e.pos, key, "set password_env or password_file, not both");
            None
        }
        (Some(e), None) if e.value.is_empty() => {
            p.at(e.pos, key, "password_env must name an environment variable");
            None
        }
        (Some(e), None) => Some(SecretSource::Env(e.value)),
        (None, Some(f)) => Some(SecretSource::File(PathBuf::from(f.value))),
        (None, None) => None,
    }
}

/// A string that must not be blank when written.
pub(crate) fn non_empty(d: &Map<'_>, k: &str, p: &mut Problems) -> Option<String> {
    let v = d.str(k, p)?;
    if v.value.trim().is_empty() {
        p.at(v.pos, d.key(k), "must not be empty");
    }
    Some(v.value)
}

/// Test helpers: a one-dependency config around a dependency's YAML.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use crate::config::{Config, ConfigError, DependencyConfig};

    /// Loads a config whose only dependency is `name` with the body `dep`
    /// (lines indented by four spaces already).
    pub(crate) fn load(name: &str, dep: &str) -> Result<DependencyConfig, Vec<(String, String)>> {
        let yaml = format!(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n\
             dependencies:\n  - name: {name}\n{dep}"
        );
        match Config::from_yaml(&yaml, Path::new("t.yaml")) {
            Ok(mut c) => Ok(c.dependencies.remove(0)),
            Err(ConfigError::Invalid { problems, .. }) => {
                Err(problems.into_iter().map(|p| (p.key, p.message)).collect())
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The problems (key, message) of a dependency `db` with the body `dep`,
    /// which must be invalid.
    pub(crate) fn problems(dep: &str) -> Vec<(String, String)> {
        load("db", dep).expect_err("config unexpectedly valid")
    }
}
