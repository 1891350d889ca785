//! Configuration: the YAML schema, parsed and validated once at load.
//!
//! The file is read into `Raw*` structs that keep the line and column of every
//! key (`Spanned`), then validated into the typed [`Config`] that the rest of
//! the program uses. No other module sees YAML. Validation collects every
//! problem it can find before failing, and each one names the file, line,
//! column and key.
//!
//! The dependency schema is one flat struct rather than an internally tagged
//! enum on purpose: serde buffers tagged enums, which loses the position of
//! every key inside them, and a config error without a line is a poor one.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::check::{amqp, http as http_check, mysql, postgres, redis, tcp as tcp_check};
use crate::routes::{RouteConfig, RouteMatch, shadows};

/// Most dependencies one process checks (the state is a 64-bit mask).
pub const MAX_DEPENDENCIES: usize = 64;
/// Longest duration accepted anywhere in the config.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

// === Errors ===

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The key the problem is about, as a dotted path (`dependencies[0].rise`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

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

/// Collects problems during validation so that all of them are reported at once.
#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    /// Records a problem at a spanned value.
    pub(crate) fn at<T>(&mut self, span: &Spanned<T>, key: impl Into<String>, msg: impl Into<String>) {
        self.0.push(Problem {
            line: span.referenced.line(),
            column: span.referenced.column(),
            key: key.into(),
            message: msg.into(),
        });
    }

    /// Records a problem at an explicit position.
    pub(crate) fn at_pos(&mut self, pos: Pos, key: impl Into<String>, msg: impl Into<String>) {
        self.0.push(Problem { line: pos.0, column: pos.1, key: key.into(), message: msg.into() });
    }
}

/// A (line, column) position in the config file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pos(pub u64, pub u64);

impl<T> From<&Spanned<T>> for Pos {
    fn from(s: &Spanned<T>) -> Self {
        Pos(s.referenced.line(), s.referenced.column())
    }
}

// === Scalar types with their own parsing (errors carry the position) ===

/// A duration written as a human string: `500ms`, `2s`, `1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?} ({e}); write e.g. 500ms, 2s, 1m")))?;
        // Deadlines are `Instant + duration`; an absurd value would overflow
        // it at run time, so it is refused here instead.
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!("duration {s:?} is too long (at most 365d)")));
        }
        Ok(HumanDuration(d))
    }
}

/// A `host:port` pair; the host is resolved at every connect, not at load.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`, `[v6]:port`, or `host` with a default port.
    pub fn parse(s: &str, default_port: Option<u16>) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty address".into());
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(format!("unexpected {after:?} after IPv6 address")),
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 literal has no port.
            (s, None)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match (port, default_port) {
            (Some(p), _) => p.parse::<u16>().map_err(|_| format!("invalid port {p:?}"))?,
            (None, Some(d)) => d,
            (None, None) => return Err(format!("{s:?} has no port; write host:port")),
        };
        if host.is_empty() {
            return Err("empty host".into());
        }
        Ok(HostPort { host: host.to_string(), port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where a secret (a password) comes from. The value itself is read when
/// needed and never stored in the config, logged or shown.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable's name.
    Env(String),
    /// A file (e.g. a mounted Kubernetes Secret); surrounding whitespace is trimmed.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(n) => write!(f, "env:{n}"),
            SecretSource::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// A secret value; `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl SecretSource {
    /// Reads the secret now (at every connect, so a rotated Secret is picked up).
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Env(name) => {
                std::env::var(name).map(Secret).map_err(|_| format!("environment variable {name} is not set"))
            }
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\r', '\n']).to_string()))
                .map_err(|e| format!("cannot read password file {}: {}", path.display(), e.kind())),
        }
    }
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
}

/// Admin server settings.
#[derive(Debug, Clone)]
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
}

/// Graceful shutdown settings (see README "Reliability").
#[derive(Debug, Clone, Copy)]
pub struct DrainConfig {
    /// After SIGTERM, keep serving this long while readiness is already 503.
    pub delay: Duration,
    /// Then wait this long for in-flight requests and connections.
    pub timeout: Duration,
}

/// What a short-circuited request receives.
#[derive(Debug, Clone)]
pub struct ShortCircuitConfig {
    /// `Retry-After` on 503 responses (whole seconds).
    pub retry_after: Duration,
    /// Add the names of the missing dependencies to the problem body.
    pub expose_dependencies: bool,
    /// Body of the 503 (out of service / starting) response.
    pub out_of_service_body: String,
    /// Body of the 500 (degraded) response.
    pub degraded_body: String,
}

/// The default 503 problem+json body (seed 000's `cause`).
pub const DEFAULT_OUT_OF_SERVICE_BODY: &str =
    r#"{"type":"about:blank","title":"Service Unavailable","status":503,"cause":"OUT OF SERVICE"}"#;
/// The default 500 problem+json body.
pub const DEFAULT_DEGRADED_BODY: &str =
    r#"{"type":"about:blank","title":"Internal Server Error","status":500,"cause":"Internal Server Error"}"#;

/// Listener protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP/1.1 reverse proxy.
    Http,
    /// Raw TCP (L4) proxy.
    Tcp,
}

/// One inbound listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name (a metric label).
    pub name: String,
    /// Protocol.
    pub protocol: ListenerProtocol,
    /// Bind address.
    pub listen: SocketAddr,
    /// The app.
    pub upstream: HostPort,
    /// Dependencies this listener needs by default (indices); `needs: all`
    /// means every non-`observe` dependency.
    pub needs: Vec<usize>,
    /// Path prefixes always proxied, whatever the state.
    pub bypass: Vec<String>,
    /// Routes in priority order (`bypass` prefixes first, as routes needing nothing).
    pub routes: Vec<RouteConfig>,
    /// Most concurrent client connections (further ones wait in the backlog).
    pub max_connections: usize,
    /// HTTP options (meaningful for `protocol: http`).
    pub http: HttpListenerConfig,
    /// TCP options (meaningful for `protocol: tcp`).
    pub tcp: TcpListenerConfig,
    /// Close a relayed connection (a TCP session, an upgraded HTTP tunnel)
    /// with no traffic either way for this long.
    pub idle_timeout: Duration,
}

/// HTTP listener options.
#[derive(Debug, Clone)]
pub struct HttpListenerConfig {
    /// Add/extend `X-Forwarded-For`.
    pub x_forwarded_for: bool,
    /// Set `X-Forwarded-Proto: http`.
    pub x_forwarded_proto: bool,
    /// Add `Via: 1.1 healthgate`.
    pub via: bool,
    /// Close a client that has not sent full request headers in this time.
    pub header_read_timeout: Duration,
    /// Close idle keep-alive client connections after this.
    pub client_idle_timeout: Duration,
    /// Bound on connecting to the app (then 502).
    pub upstream_connect_timeout: Duration,
    /// Bound on waiting for the app's response headers (then 504).
    pub upstream_response_timeout: Duration,
    /// Idle pooled upstream connections are closed after this.
    pub upstream_idle_timeout: Duration,
    /// Most idle pooled upstream connections per worker.
    pub upstream_pool_max_idle: usize,
    /// Largest request head (request line + headers) in bytes (then 431).
    pub max_header_bytes: usize,
    /// Most request headers (then 431).
    pub max_headers: usize,
    /// Largest request body in bytes (then 413); 0 = unlimited.
    pub max_body_bytes: u64,
}

/// What a TCP listener does with a connection it does not admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpReject {
    /// Accept and close at once (FIN).
    Close,
    /// Accept and reset (RST).
    Reset,
}

/// What a TCP listener does with established connections when the service goes out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpOnOutage {
    /// Keep them.
    Keep,
    /// Close them.
    CloseExisting,
}

/// TCP listener options.
#[derive(Debug, Clone)]
pub struct TcpListenerConfig {
    /// How a rejected connection is ended.
    pub reject: TcpReject,
    /// What happens to open connections when the service goes out of service.
    pub on_outage: TcpOnOutage,
    /// Admit new connections while degraded (default true).
    pub admit_degraded: bool,
    /// Bound on connecting to the app.
    pub connect_timeout: Duration,
}

/// How a dependency's outage affects the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
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
#[derive(Debug, Clone)]
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
    /// Protocol-specific settings.
    pub kind: DependencyKind,
}

/// Protocol-specific settings of a dependency.
#[derive(Debug, Clone)]
pub enum DependencyKind {
    /// Plain TCP connect (optional send/expect).
    Tcp(tcp_check::TcpSettings),
    /// HTTP GET.
    Http(http_check::HttpSettings),
    /// MySQL / MariaDB.
    Mysql(mysql::MysqlSettings),
    /// PostgreSQL.
    Postgres(postgres::PostgresSettings),
    /// Redis.
    Redis(redis::RedisSettings),
    /// RabbitMQ (AMQP 0-9-1).
    Amqp(amqp::AmqpSettings),
}

impl DependencyKind {
    /// The `type` label.
    pub fn type_name(&self) -> &'static str {
        match self {
            DependencyKind::Tcp(_) => "tcp",
            DependencyKind::Http(_) => "http",
            DependencyKind::Mysql(_) => "mysql",
            DependencyKind::Postgres(_) => "postgres",
            DependencyKind::Redis(_) => "redis",
            DependencyKind::Amqp(_) => "amqp",
        }
    }
}

// === Raw schema ===

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workers: Option<S<usize>>,
    admin: Option<RawAdmin>,
    drain: Option<RawDrain>,
    short_circuit: Option<RawShortCircuit>,
    #[serde(default)]
    listeners: Vec<S<RawListener>>,
    #[serde(default)]
    dependencies: Vec<S<RawDependency>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<S<String>>,
    ready_when_degraded: Option<bool>,
    ready_when_out_of_service: Option<bool>,
    liveness_stall: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    delay: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShortCircuit {
    retry_after: Option<HumanDuration>,
    expose_dependencies: Option<bool>,
    out_of_service_body: Option<S<String>>,
    degraded_body: Option<S<String>>,
}

/// `needs: all` or a list of dependency names.
///
/// Deserialized by hand: serde's `untagged` would buffer the value and lose
/// the position of each name.
enum RawNeeds {
    Keyword(String),
    List(Vec<S<String>>),
}

impl<'de> Deserialize<'de> for RawNeeds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawNeeds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all` or a list of dependency names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawNeeds, E> {
                Ok(RawNeeds::Keyword(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawNeeds, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<S<String>>()? {
                    names.push(n);
                }
                Ok(RawNeeds::List(names))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: S<String>,
    protocol: Option<S<ListenerProtocol>>,
    listen: S<String>,
    upstream: S<String>,
    needs: Option<S<RawNeeds>>,
    #[serde(default)]
    bypass: Vec<S<String>>,
    #[serde(default)]
    routes: Vec<S<RawRoute>>,
    max_connections: Option<S<usize>>,
    idle_timeout: Option<S<HumanDuration>>,
    // http
    x_forwarded_for: Option<S<bool>>,
    x_forwarded_proto: Option<S<bool>>,
    via: Option<S<bool>>,
    header_read_timeout: Option<S<HumanDuration>>,
    client_idle_timeout: Option<S<HumanDuration>>,
    upstream_connect_timeout: Option<S<HumanDuration>>,
    upstream_response_timeout: Option<S<HumanDuration>>,
    upstream_idle_timeout: Option<S<HumanDuration>>,
    upstream_pool_max_idle: Option<S<usize>>,
    max_header_bytes: Option<S<usize>>,
    max_headers: Option<S<usize>>,
    max_body_bytes: Option<S<u64>>,
    // tcp
    reject: Option<S<TcpReject>>,
    on_outage: Option<S<TcpOnOutage>>,
    admit_degraded: Option<S<bool>>,
    connect_timeout: Option<S<HumanDuration>>,
}

impl RawListener {
    /// Keys that belong to the other protocol, with their positions: a
    /// `reject:` on an HTTP listener would otherwise be silently ignored.
    fn foreign_keys(&self, protocol: ListenerProtocol) -> Vec<(&'static str, Pos)> {
        macro_rules! present {
            ($($f:ident),* $(,)?) => {{
                let mut v = Vec::new();
                $( if let Some(x) = &self.$f { v.push((stringify!($f), Pos::from(x))); } )*
                v
            }};
        }
        match protocol {
            ListenerProtocol::Http => present!(reject, on_outage, admit_degraded, connect_timeout),
            ListenerProtocol::Tcp => {
                let mut v = present!(
                    x_forwarded_for,
                    x_forwarded_proto,
                    via,
                    header_read_timeout,
                    client_idle_timeout,
                    upstream_connect_timeout,
                    upstream_response_timeout,
                    upstream_idle_timeout,
                    upstream_pool_max_idle,
                    max_header_bytes,
                    max_headers,
                    max_body_bytes,
                );
                v.extend(self.bypass.first().map(|b| ("bypass", Pos::from(b))));
                v.extend(self.routes.first().map(|r| ("routes", Pos::from(r))));
                v
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: S<String>,
    #[serde(rename = "match")]
    matcher: Option<S<RawMatch>>,
    needs: Option<S<RawNeeds>>,
    short_circuit: Option<RawRouteShortCircuit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    path_prefix: Option<S<String>>,
    path: Option<S<String>>,
    methods: Option<Vec<S<String>>>,
    headers: Option<Vec<S<RawHeaderMatch>>>,
    host: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderMatch {
    name: String,
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteShortCircuit {
    out_of_service_body: Option<S<String>>,
    degraded_body: Option<S<String>>,
    expose_dependencies: Option<bool>,
}

/// Every key any dependency type accepts. Which keys a type allows is checked
/// in [`validate_dependency`], so a key of another type is reported at its
/// own line rather than silently ignored.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDependency {
    pub(crate) name: Option<S<String>>,
    #[serde(rename = "type")]
    pub(crate) kind: Option<S<String>>,
    pub(crate) impact: Option<S<Impact>>,
    pub(crate) interval: Option<S<HumanDuration>>,
    pub(crate) interval_down: Option<S<HumanDuration>>,
    pub(crate) timeout: Option<S<HumanDuration>>,
    pub(crate) rise: Option<S<u32>>,
    pub(crate) fall: Option<S<u32>>,
    pub(crate) jitter: Option<S<f64>>,
    // tcp
    pub(crate) address: Option<S<String>>,
    pub(crate) send: Option<S<String>>,
    pub(crate) expect: Option<S<String>>,
    // http
    pub(crate) url: Option<S<String>>,
    pub(crate) expect_status: Option<S<Vec<u16>>>,
    pub(crate) expect_body: Option<S<String>>,
    pub(crate) host_header: Option<S<String>>,
    // shared by mysql / redis / amqp
    pub(crate) user: Option<S<String>>,
    pub(crate) username: Option<S<String>>,
    pub(crate) password_env: Option<S<String>>,
    pub(crate) password_file: Option<S<String>>,
    pub(crate) tls: Option<S<bool>>,
    pub(crate) tls_ca_file: Option<S<String>>,
    pub(crate) tls_cert_file: Option<S<String>>,
    pub(crate) tls_key_file: Option<S<String>>,
    pub(crate) tls_server_name: Option<S<String>>,
    // mysql
    pub(crate) database: Option<S<String>>,
    pub(crate) query: Option<S<String>>,
    pub(crate) require_writable: Option<S<bool>>,
    pub(crate) galera: Option<S<bool>>,
    pub(crate) galera_allow_donor: Option<S<bool>>,
    // postgres
    pub(crate) application_name: Option<S<String>>,
    // redis
    pub(crate) db: Option<S<i64>>,
    pub(crate) require_role: Option<S<String>>,
    pub(crate) sentinel: Option<S<RawSentinel>>,
    // amqp
    pub(crate) urls: Option<S<Vec<S<String>>>>,
    pub(crate) nodes: Option<S<Vec<S<String>>>>,
    pub(crate) require: Option<S<String>>,
    pub(crate) queues: Option<S<Vec<S<String>>>>,
    pub(crate) heartbeat: Option<S<HumanDuration>>,
}

/// Redis Sentinel settings as written.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSentinel {
    pub(crate) addresses: Vec<S<String>>,
    pub(crate) master_name: S<String>,
    pub(crate) password_env: Option<S<String>>,
    pub(crate) password_file: Option<S<String>>,
}

/// Names of the keys present in a raw dependency (for the per-type allow list).
fn present_keys(d: &RawDependency) -> Vec<(&'static str, Pos)> {
    macro_rules! keys {
        ($($f:ident => $k:literal),* $(,)?) => {{
            let mut v = Vec::new();
            $( if let Some(x) = &d.$f { v.push(($k, Pos::from(x))); } )*
            v
        }};
    }
    keys!(
        address => "address", send => "send", expect => "expect", url => "url",
        expect_status => "expect_status", expect_body => "expect_body", host_header => "host_header",
        user => "user", username => "username", password_env => "password_env",
        password_file => "password_file", tls => "tls", tls_ca_file => "tls_ca_file",
        tls_cert_file => "tls_cert_file", tls_key_file => "tls_key_file",
        tls_server_name => "tls_server_name", database => "database", query => "query",
        require_writable => "require_writable", galera => "galera",
        galera_allow_donor => "galera_allow_donor", application_name => "application_name", db => "db", require_role => "require_role",
        sentinel => "sentinel", urls => "urls", nodes => "nodes", require => "require",
        queues => "queues", heartbeat => "heartbeat",
    )
}

/// Reads a secret source from a `password_env`/`password_file` pair.
pub(crate) fn secret_source(
    env: &Option<S<String>>,
    file: &Option<S<String>>,
    key: &str,
    problems: &mut Problems,
) -> Option<SecretSource> {
    match (env, file) {
        (Some(e), Some(_)) => {
            problems.at(e, key, "set password_env or password_file, not both");
            None
        }
        (Some(e), None) if e.value.is_empty() => {
            problems.at(e, key, "password_env must name an environment variable");
            None
        }
        (Some(e), None) => Some(SecretSource::Env(e.value.clone())),
        (None, Some(f)) => Some(SecretSource::File(PathBuf::from(&f.value))),
        (None, None) => None,
    }
}

// === Loading ===

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_yaml(&text, path)
    }

    /// Validates config text; `path` is only used in messages.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            invalid(vec![yaml_problem(&e.without_snippet().to_string(), line, column, text)])
        })?;
        let mut problems = Problems::default();
        let config = validate(raw, path, &mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            problems.0.sort_by_key(|p| (p.line, p.column));
            Err(invalid(problems.0))
        }
    }

    /// Index of a dependency by name.
    pub fn dependency_index(&self, name: &str) -> Option<usize> {
        self.dependencies.iter().position(|d| d.name == name)
    }
}

/// Turns a YAML/serde error message into a [`Problem`], naming the key when
/// the message does (`unknown field `x``, `missing field `x``).
fn yaml_problem(message: &str, line: u64, column: u64, text: &str) -> Problem {
    // saphyr says "error: line L column C: <message> at line L, column C"; keep the message.
    let mut m = message.trim();
    if let Some(rest) = m.strip_prefix("error: ") {
        m = rest.split_once(": ").filter(|(pos, _)| pos.starts_with("line ")).map(|(_, r)| r).unwrap_or(rest);
    }
    if let Some(i) = m.rfind(" at line ") {
        m = &m[..i];
    }
    let key = ["unknown field `", "missing field `", "unknown variant `"]
        .iter()
        .find_map(|p| m.split_once(p).and_then(|(_, r)| r.split_once('`')).map(|(k, _)| k.to_string()))
        .or_else(|| key_on_line(text, line))
        .unwrap_or_else(|| "(yaml)".into());
    Problem { line, column, key, message: m.to_string() }
}

/// The mapping key written on a line (`  rise: x` → `rise`), if any.
fn key_on_line(text: &str, line: u64) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)? as usize)?;
    let (k, _) = l.split_once(':')?;
    let k = k.trim().trim_start_matches("- ").trim().trim_matches(['"', '\'']);
    (!k.is_empty() && !k.contains(' ')).then(|| k.to_string())
}

fn parse_socket_addr(s: &S<String>, key: &str, problems: &mut Problems) -> SocketAddr {
    match s.value.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            problems.at(s, key, format!("{:?} is not an IP:port listen address (e.g. 0.0.0.0:8080)", s.value));
            SocketAddr::from(([0, 0, 0, 0], 0))
        }
    }
}

fn validate(raw: RawConfig, path: &Path, problems: &mut Problems) -> Config {
    let workers = match raw.workers {
        Some(w) if w.value == 0 || w.value > 256 => {
            problems.at(&w, "workers", "must be between 1 and 256");
            1
        }
        Some(w) => w.value,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };

    let admin = {
        let a = raw.admin.unwrap_or(RawAdmin {
            listen: None,
            ready_when_degraded: None,
            ready_when_out_of_service: None,
            liveness_stall: None,
        });
        AdminConfig {
            listen: a
                .listen
                .as_ref()
                .map(|l| parse_socket_addr(l, "admin.listen", problems))
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 9901))),
            ready_when_degraded: a.ready_when_degraded.unwrap_or(true),
            ready_when_out_of_service: a.ready_when_out_of_service.unwrap_or(false),
            liveness_stall: a.liveness_stall.map(|d| d.0).unwrap_or(Duration::from_secs(10)),
        }
    };

    let drain = {
        let d = raw.drain.unwrap_or(RawDrain { delay: None, timeout: None });
        DrainConfig {
            delay: d.delay.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
            timeout: d.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(20)),
        }
    };

    let short_circuit = {
        let s = raw.short_circuit.unwrap_or(RawShortCircuit {
            retry_after: None,
            expose_dependencies: None,
            out_of_service_body: None,
            degraded_body: None,
        });
        let body = |b: Option<S<String>>, key: &str, default: &str, problems: &mut Problems| match b {
            Some(b) => {
                if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&b.value).is_err() {
                    problems.at(&b, key, "must be a JSON object (it is sent as application/problem+json)");
                }
                b.value
            }
            None => default.to_string(),
        };
        ShortCircuitConfig {
            retry_after: s.retry_after.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
            expose_dependencies: s.expose_dependencies.unwrap_or(false),
            out_of_service_body: body(
                s.out_of_service_body,
                "short_circuit.out_of_service_body",
                DEFAULT_OUT_OF_SERVICE_BODY,
                problems,
            ),
            degraded_body: body(s.degraded_body, "short_circuit.degraded_body", DEFAULT_DEGRADED_BODY, problems),
        }
    };

    let mut dependencies = Vec::new();
    let mut dep_names = HashSet::new();
    for (i, d) in raw.dependencies.into_iter().enumerate() {
        let pos = Pos::from(&d);
        if let Some(name) = &d.value.name
            && !dep_names.insert(name.value.clone())
        {
            problems.at(name, format!("dependencies[{i}].name"), format!("duplicate dependency name {:?}", name.value));
        }
        if let Some(dep) = validate_dependency(d.value, i, pos, problems) {
            dependencies.push(dep);
        }
    }
    if dependencies.len() > MAX_DEPENDENCIES {
        problems.at_pos(Pos(0, 0), "dependencies", format!("at most {MAX_DEPENDENCIES} dependencies"));
    }

    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, l) in raw.listeners.into_iter().enumerate() {
        let key = |k: &str| format!("listeners[{i}].{k}");
        let l = l.value;
        if l.name.value.is_empty() || !l.name.value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            problems.at(&l.name, key("name"), "must be non-empty and use only letters, digits, '_' and '-'");
        }
        if !names.insert(l.name.value.clone()) {
            problems.at(&l.name, key("name"), format!("duplicate listener name {:?}", l.name.value));
        }
        let listen = parse_socket_addr(&l.listen, &key("listen"), problems);
        if listen.port() != 0 && !addrs.insert(listen) {
            problems.at(&l.listen, key("listen"), "two listeners on the same address");
        }
        let upstream = HostPort::parse(&l.upstream.value, None).unwrap_or_else(|e| {
            problems.at(&l.upstream, key("upstream"), e);
            HostPort { host: String::new(), port: 0 }
        });
        let needs = resolve_needs(l.needs.as_ref(), &dependencies, &key("needs"), problems);
        for b in &l.bypass {
            if !b.value.starts_with('/') {
                problems.at(b, key("bypass"), "a bypass path prefix must start with '/'");
            }
        }
        let routes = validate_routes(&l.bypass, &l.routes, &needs, &dependencies, &key("routes"), problems);
        let positive = |v: &Option<S<usize>>, k: &str, default: usize, problems: &mut Problems| match v {
            Some(s) if s.value == 0 => {
                problems.at(s, key(k), "must be at least 1");
                default
            }
            Some(s) => s.value,
            None => default,
        };
        let max_header_bytes = positive(&l.max_header_bytes, "max_header_bytes", 16 * 1024, problems);
        if max_header_bytes < 8192
            && let Some(s) = &l.max_header_bytes
        {
            problems.at(s, key("max_header_bytes"), "must be at least 8192");
        }
        let protocol = l.protocol.as_ref().map(|p| p.value).unwrap_or(ListenerProtocol::Http);
        for (k, pos) in l.foreign_keys(protocol) {
            let other = match protocol {
                ListenerProtocol::Http => "tcp",
                ListenerProtocol::Tcp => "http",
            };
            problems.at_pos(pos, key(k), format!("`{k}` is a setting of `protocol: {other}` listeners only"));
        }
        let dur = |v: &Option<S<HumanDuration>>, default: u64| {
            v.as_ref().map(|d| d.value.0).unwrap_or(Duration::from_secs(default))
        };
        let flag = |v: &Option<S<bool>>, default: bool| v.as_ref().map(|b| b.value).unwrap_or(default);
        listeners.push(ListenerConfig {
            name: l.name.value,
            protocol,
            listen,
            upstream,
            needs,
            bypass: l.bypass.into_iter().map(|b| b.value).collect(),
            routes,
            max_connections: positive(&l.max_connections, "max_connections", 10_000, problems),
            http: HttpListenerConfig {
                x_forwarded_for: flag(&l.x_forwarded_for, true),
                x_forwarded_proto: flag(&l.x_forwarded_proto, true),
                via: flag(&l.via, true),
                header_read_timeout: dur(&l.header_read_timeout, 10),
                client_idle_timeout: dur(&l.client_idle_timeout, 60),
                upstream_connect_timeout: dur(&l.upstream_connect_timeout, 2),
                upstream_response_timeout: dur(&l.upstream_response_timeout, 60),
                upstream_idle_timeout: dur(&l.upstream_idle_timeout, 30),
                upstream_pool_max_idle: l.upstream_pool_max_idle.as_ref().map(|v| v.value).unwrap_or(256),
                max_header_bytes,
                max_headers: positive(&l.max_headers, "max_headers", 100, problems),
                max_body_bytes: l.max_body_bytes.as_ref().map(|v| v.value).unwrap_or(0),
            },
            idle_timeout: dur(&l.idle_timeout, 3600),
            tcp: TcpListenerConfig {
                reject: l.reject.as_ref().map(|v| v.value).unwrap_or(TcpReject::Close),
                on_outage: l.on_outage.as_ref().map(|v| v.value).unwrap_or(TcpOnOutage::Keep),
                admit_degraded: flag(&l.admit_degraded, true),
                connect_timeout: dur(&l.connect_timeout, 2),
            },
        });
    }
    if listeners.is_empty() {
        problems.at_pos(Pos(1, 1), "listeners", "at least one listener is required");
    }

    Config { path: path.to_path_buf(), workers, admin, drain, short_circuit, listeners, dependencies }
}

/// Validates a listener's routes; `bypass` prefixes become routes needing nothing, placed first.
fn validate_routes(
    bypass: &[S<String>],
    raw: &[S<RawRoute>],
    listener_needs: &[usize],
    deps: &[DependencyConfig],
    key: &str,
    problems: &mut Problems,
) -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = bypass
        .iter()
        .map(|b| RouteConfig {
            name: "bypass".into(),
            matcher: RouteMatch { path_prefix: Some(b.value.clone()), ..Default::default() },
            needs: Vec::new(),
            bypass: true,
            out_of_service_body: None,
            degraded_body: None,
            expose_dependencies: None,
            pos: Pos::from(b),
        })
        .collect();
    let mut names = HashSet::new();
    for (i, r) in raw.iter().enumerate() {
        let rkey = |k: &str| format!("{key}[{i}].{k}");
        let r = &r.value;
        let name = &r.name;
        if name.value.is_empty() || !name.value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            problems.at(name, rkey("name"), "must be non-empty and use only letters, digits, '_' and '-'");
        } else if name.value == "default" || name.value == "bypass" {
            problems.at(name, rkey("name"), format!("`{}` is reserved", name.value));
        } else if !names.insert(name.value.clone()) {
            problems.at(name, rkey("name"), format!("duplicate route name {:?}", name.value));
        }
        let mut matcher = RouteMatch::default();
        if let Some(m) = &r.matcher {
            let m = &m.value;
            for (field, v) in [("match.path_prefix", &m.path_prefix), ("match.path", &m.path)] {
                if let Some(v) = v.as_ref().filter(|v| !v.value.starts_with('/')) {
                    problems.at(v, rkey(field), "must start with '/'");
                }
            }
            if let (Some(_), Some(p)) = (&m.path_prefix, &m.path) {
                problems.at(p, rkey("match.path"), "set path or path_prefix, not both");
            }
            matcher.path_prefix = m.path_prefix.as_ref().map(|p| p.value.clone());
            matcher.path = m.path.as_ref().map(|p| p.value.clone());
            for meth in m.methods.iter().flatten() {
                if meth.value.is_empty() || !meth.value.bytes().all(|b| b.is_ascii_uppercase()) {
                    problems.at(
                        meth,
                        rkey("match.methods"),
                        format!("{:?} is not an upper-case HTTP method", meth.value),
                    );
                }
                matcher.methods.push(meth.value.clone());
            }
            for h in m.headers.iter().flatten() {
                if hyper::header::HeaderName::from_bytes(h.value.name.as_bytes()).is_err() {
                    problems.at(h, rkey("match.headers"), format!("{:?} is not a header name", h.value.name));
                }
                matcher.headers.push(crate::routes::HeaderMatch {
                    name: h.value.name.to_ascii_lowercase(),
                    value: h.value.value.clone(),
                });
            }
            matcher.host = m.host.as_ref().map(|h| h.value.to_ascii_lowercase());
        }
        let needs = match &r.needs {
            Some(_) => resolve_needs(r.needs.as_ref(), deps, &rkey("needs"), problems),
            None => listener_needs.to_vec(),
        };
        let sc = r.short_circuit.as_ref();
        let body = |b: Option<&S<String>>, k: &str, problems: &mut Problems| {
            b.map(|b| {
                if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&b.value).is_err() {
                    problems.at(b, rkey(k), "must be a JSON object (it is sent as application/problem+json)");
                }
                b.value.clone()
            })
        };
        routes.push(RouteConfig {
            name: name.value.clone(),
            matcher,
            needs,
            bypass: false,
            out_of_service_body: body(
                sc.and_then(|s| s.out_of_service_body.as_ref()),
                "short_circuit.out_of_service_body",
                problems,
            ),
            degraded_body: body(sc.and_then(|s| s.degraded_body.as_ref()), "short_circuit.degraded_body", problems),
            expose_dependencies: sc.and_then(|s| s.expose_dependencies),
            pos: Pos::from(name),
        });
    }
    for (j, later) in routes.iter().enumerate() {
        if let Some(earlier) = routes[..j].iter().find(|e| shadows(&e.matcher, &later.matcher)) {
            let which = if later.bypass { "bypass prefix".to_string() } else { format!("route {:?}", later.name) };
            problems.at_pos(
                later.pos,
                key.to_string(),
                format!(
                    "{which} is unreachable: {} at line {} matches every request it matches (first match wins)",
                    if earlier.bypass { "a bypass prefix".to_string() } else { format!("route {:?}", earlier.name) },
                    earlier.pos.0
                ),
            );
        }
    }
    routes
}

/// Resolves a `needs:` value to dependency indices (default: every gating dependency).
fn resolve_needs(
    needs: Option<&S<RawNeeds>>,
    deps: &[DependencyConfig],
    key: &str,
    problems: &mut Problems,
) -> Vec<usize> {
    let all = || deps.iter().enumerate().filter(|(_, d)| d.impact != Impact::Observe).map(|(i, _)| i).collect();
    match needs {
        None => all(),
        Some(n) => match &n.value {
            RawNeeds::Keyword(k) if k == "all" => all(),
            RawNeeds::Keyword(k) => {
                problems.at(n, key, format!("expected `all` or a list of dependency names, found {k:?}"));
                Vec::new()
            }
            RawNeeds::List(names) => {
                let mut out = Vec::new();
                for name in names {
                    match deps.iter().position(|d| d.name == name.value) {
                        Some(i) if !out.contains(&i) => out.push(i),
                        Some(_) => {}
                        None => problems.at(name, key, format!("unknown dependency {:?}", name.value)),
                    }
                }
                out
            }
        },
    }
}

/// Validates one dependency; returns `None` when it is too broken to build.
fn validate_dependency(d: RawDependency, i: usize, pos: Pos, problems: &mut Problems) -> Option<DependencyConfig> {
    let key = |k: &str| format!("dependencies[{i}].{k}");
    let Some(name) = &d.name else {
        problems.at_pos(pos, key("name"), "missing key `name`");
        return None;
    };
    if name.value.is_empty()
        || !name.value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        problems.at(name, key("name"), "must be non-empty and use only letters, digits, '_', '-' and '.'");
    }
    let Some(kind) = &d.kind else {
        problems.at_pos(pos, key("type"), "missing key `type` (tcp, http, mysql, postgres, redis, amqp)");
        return None;
    };
    let type_name = match kind.value.as_str() {
        "rabbitmq" => "amqp",
        "mariadb" => "mysql",
        "postgresql" => "postgres",
        other => other,
    };
    let allowed: &[&str] = match type_name {
        "tcp" => tcp_check::KEYS,
        "http" => http_check::KEYS,
        "mysql" => mysql::KEYS,
        "postgres" => postgres::KEYS,
        "redis" => redis::KEYS,
        "amqp" => amqp::KEYS,
        other => {
            problems.at(
                kind,
                key("type"),
                format!("unknown dependency type {other:?}; expected one of tcp, http, mysql, postgres, redis, amqp"),
            );
            return None;
        }
    };
    for (k, p) in present_keys(&d) {
        // Every type can speak TLS, so the TLS keys are allowed everywhere.
        if !allowed.contains(&k) && !crate::check::tls::KEYS.contains(&k) {
            problems.at_pos(p, key(k), format!("`{k}` is not a setting of a `{type_name}` dependency"));
        }
    }

    let default_impact = if type_name == "redis" { Impact::Degraded } else { Impact::OutOfService };
    let interval = d.interval.as_ref().map(|d| d.value.0).unwrap_or(Duration::from_secs(2));
    let timeout = d.timeout.as_ref().map(|d| d.value.0).unwrap_or(Duration::from_secs(1));
    let nonzero = |v: &Option<S<HumanDuration>>, k: &str, problems: &mut Problems| {
        if let Some(v) = v
            && v.value.0.is_zero()
        {
            problems.at(v, key(k), "must be greater than zero");
        }
    };
    nonzero(&d.interval, "interval", problems);
    nonzero(&d.interval_down, "interval_down", problems);
    nonzero(&d.timeout, "timeout", problems);
    let count = |v: &Option<S<u32>>, k: &str, default: u32, problems: &mut Problems| match v {
        Some(s) if s.value == 0 || s.value > 100 => {
            problems.at(s, key(k), "must be between 1 and 100");
            default
        }
        Some(s) => s.value,
        None => default,
    };
    let rise = count(&d.rise, "rise", 2, problems);
    let fall = count(&d.fall, "fall", 2, problems);
    let jitter = match &d.jitter {
        Some(j) if !(0.0..=0.5).contains(&j.value) => {
            problems.at(j, key("jitter"), "must be between 0.0 and 0.5");
            0.1
        }
        Some(j) => j.value,
        None => 0.1,
    };

    let ctx = KindCtx { index: i, pos, problems };
    let kind = match type_name {
        "tcp" => tcp_check::TcpSettings::from_raw(&d, ctx).map(DependencyKind::Tcp),
        "http" => http_check::HttpSettings::from_raw(&d, ctx).map(DependencyKind::Http),
        "mysql" => mysql::MysqlSettings::from_raw(&d, ctx).map(DependencyKind::Mysql),
        "postgres" => postgres::PostgresSettings::from_raw(&d, ctx).map(DependencyKind::Postgres),
        "redis" => redis::RedisSettings::from_raw(&d, ctx).map(DependencyKind::Redis),
        "amqp" => amqp::AmqpSettings::from_raw(&d, ctx).map(DependencyKind::Amqp),
        _ => unreachable!("type checked above"),
    }?;

    Some(DependencyConfig {
        name: name.value.clone(),
        impact: d.impact.as_ref().map(|i| i.value).unwrap_or(default_impact),
        interval,
        interval_down: d.interval_down.as_ref().map(|d| d.value.0).unwrap_or(interval),
        timeout,
        rise,
        fall,
        jitter,
        kind,
    })
}

/// What a protocol's `from_raw` needs to report problems.
pub(crate) struct KindCtx<'a> {
    /// Index of the dependency in the file.
    pub(crate) index: usize,
    /// Position of the dependency item.
    pub(crate) pos: Pos,
    /// Where problems go.
    pub(crate) problems: &'a mut Problems,
}

impl KindCtx<'_> {
    /// The dotted key of a field of this dependency.
    pub(crate) fn key(&self, k: &str) -> String {
        format!("dependencies[{}].{k}", self.index)
    }

    /// Reports a problem at a spanned field.
    pub(crate) fn error<T>(&mut self, span: &Spanned<T>, k: &str, msg: impl Into<String>) {
        let key = self.key(k);
        self.problems.at(span, key, msg);
    }

    /// Reports a missing required key.
    pub(crate) fn missing(&mut self, k: &str) {
        let key = self.key(k);
        self.problems.at_pos(self.pos, key, format!("missing key `{k}`"));
    }

    /// A required string field, or a problem.
    pub(crate) fn required<'b>(&mut self, v: &'b Option<S<String>>, k: &str) -> Option<&'b S<String>> {
        if v.is_none() {
            self.missing(k);
        }
        v.as_ref()
    }

    /// Parses a `host:port` field.
    pub(crate) fn host_port(&mut self, v: &S<String>, k: &str, default_port: Option<u16>) -> Option<HostPort> {
        match HostPort::parse(&v.value, default_port) {
            Ok(h) => Some(h),
            Err(e) => {
                self.error(v, k, e);
                None
            }
        }
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
    fn the_shipped_example_config_is_valid() {
        let c = Config::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"))).expect("config.yaml");
        assert!(!c.listeners.is_empty());
    }

    #[test]
    fn issue_contract_config_is_accepted_as_written() {
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
        let yaml = format!(
            "{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: nohost\n    rise: 0\n  - name: db\n    type: tcp\n    address: a:1\n    interval: fast\n"
        );
        // A YAML type error stops serde at once; semantic ones are collected.
        let p = problems(&yaml);
        assert_eq!(p.len(), 1, "{p:?}");
        let yaml = format!(
            "{MINIMAL}dependencies:\n  - name: db\n    type: tcp\n    address: nohost\n    rise: 0\n  - name: db\n    type: tcp\n    address: a:1\n"
        );
        let p = problems(&yaml);
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["dependencies[0].address", "dependencies[0].rise", "dependencies[1].name"], "{p:?}");
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

    #[test]
    fn host_port_parsing() {
        assert_eq!(HostPort::parse("db:3306", None).unwrap(), HostPort { host: "db".into(), port: 3306 });
        assert_eq!(HostPort::parse("[::1]:80", None).unwrap(), HostPort { host: "::1".into(), port: 80 });
        assert_eq!(HostPort::parse("::1", Some(5)).unwrap(), HostPort { host: "::1".into(), port: 5 });
        assert_eq!(HostPort::parse("db", Some(6379)).unwrap().port, 6379);
        assert!(HostPort::parse("db", None).is_err());
        assert!(HostPort::parse("db:x", None).is_err());
        assert_eq!(HostPort::parse("[::1]:80", None).unwrap().to_string(), "[::1]:80");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "\"***\"");
    }
}
