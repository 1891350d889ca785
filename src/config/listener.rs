//! Listener configuration: the inbound ports, their protocol options and defaults.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::dependency::Declared;
use super::hostport::HostPort;
use super::node::{Map, Node};
use super::problem::{At, Problems, is_name};
use super::route::{self, NAME_CHARS, RouteConfig};

/// Default most concurrent client connections of a listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default bound on receiving a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time after which a keep-alive client connection is closed.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on connecting to the app (HTTP and TCP listeners).
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default bound on waiting for the app's response headers.
pub const DEFAULT_UPSTREAM_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default idle time after which a pooled upstream connection is closed.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default most idle pooled upstream connections per worker.
pub const DEFAULT_UPSTREAM_POOL_MAX_IDLE: usize = 256;
/// Default largest request head in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Smallest `max_header_bytes` accepted (below it ordinary browsers fail).
pub const MIN_MAX_HEADER_BYTES: usize = 8192;
/// Default most request headers.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default idle time after which a relayed connection (TCP session, upgraded tunnel) is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default most refused TCP connections held for `reject_delay` at once, per listener.
pub const DEFAULT_REJECT_HOLD_MAX: usize = 1000;
/// Longest `reject_delay`: a client's own connect or handshake timeout is
/// typically 10-30 s; holding longer only ties up sockets.
pub const MAX_REJECT_DELAY: Duration = Duration::from_secs(60);

/// Default most concurrent HTTP/2 streams per client connection.
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Default most streams a client may reset before healthgate accepted them
/// (rapid reset, CVE-2023-44487); over it the connection gets `GOAWAY`.
pub const DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Default most streams healthgate may reset for a client's protocol errors
/// on one connection before it ends the connection.
pub const DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// Keys of every listener.
const KEYS: &[&str] = &["name", "protocol", "listen", "upstream", "needs", "max_connections", "idle_timeout"];
/// Keys of `protocol: http` listeners only.
const HTTP_KEYS: &[&str] = &[
    "bypass",
    "routes",
    "x_forwarded_for",
    "x_forwarded_proto",
    "via",
    "header_read_timeout",
    "client_idle_timeout",
    "upstream_connect_timeout",
    "upstream_response_timeout",
    "upstream_idle_timeout",
    "upstream_pool_max_idle",
    "max_header_bytes",
    "max_headers",
    "max_body_bytes",
    "upstream_protocol",
    "http2",
    "http2_max_concurrent_streams",
    "http2_max_header_list_size",
    "http2_max_pending_accept_reset_streams",
    "http2_max_local_error_reset_streams",
    "abort_on_client_close",
];
/// Keys of `protocol: tcp` listeners only.
const TCP_KEYS: &[&str] =
    &["reject", "on_outage", "admit_degraded", "connect_timeout", "reject_delay", "reject_hold_max"];

/// Listener protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP reverse proxy (HTTP/1.1, and HTTP/2 with prior knowledge).
    Http,
    /// Raw TCP (L4) proxy.
    Tcp,
}

impl ListenerProtocol {
    /// The keywords as written in the config.
    const CHOICES: &[(&str, ListenerProtocol)] = &[("http", ListenerProtocol::Http), ("tcp", ListenerProtocol::Tcp)];
}

/// The protocol an HTTP listener speaks to its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, a pool of keep-alive connections (HTTP/2 clients translated).
    Http1,
    /// Cleartext HTTP/2 with prior knowledge: one multiplexed connection per worker.
    H2c,
}

/// One inbound listener.
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, PartialEq)]
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
    /// What the app speaks.
    pub upstream_protocol: UpstreamProtocol,
    /// Accept HTTP/2 with prior knowledge (h2c) on the same port.
    pub http2: bool,
    /// Most concurrent streams per HTTP/2 client connection.
    pub http2_max_concurrent_streams: u32,
    /// Largest decoded header list of an HTTP/2 request (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub http2_max_header_list_size: u32,
    /// Streams a client may open and reset before they were accepted (rapid reset).
    pub http2_max_pending_accept_reset_streams: usize,
    /// Streams reset for a client's errors before the connection ends.
    pub http2_max_local_error_reset_streams: usize,
    /// A client closing its sending side while its request is at the app
    /// cancels the request (`client_closed`), as nginx does; otherwise
    /// (default, as HAProxy) it is a half-close and still gets its answer.
    pub abort_on_client_close: bool,
}

/// What a TCP listener does with a connection it does not admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpReject {
    /// Accept and close at once (FIN).
    Close,
    /// Accept and reset (RST).
    Reset,
}

/// What a TCP listener does with established connections when the service goes out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOnOutage {
    /// Keep them.
    Keep,
    /// Close them.
    CloseExisting,
}

/// TCP listener options.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpListenerConfig {
    /// How a rejected connection is ended.
    pub reject: TcpReject,
    /// What happens to open connections when the service goes out of service.
    pub on_outage: TcpOnOutage,
    /// Admit new connections while degraded (default true).
    pub admit_degraded: bool,
    /// Bound on connecting to the app.
    pub connect_timeout: Duration,
    /// How long a refused connection is held (jittered down to half) before
    /// it is ended, so clients that reconnect at once do not spin; zero ends
    /// it at once.
    pub reject_delay: Duration,
    /// Most refused connections held at once (across workers); beyond it
    /// they are ended at once.
    pub reject_hold_max: usize,
}

/// Parses a listen address (`IP:port`); a problem gives the unspecified address.
pub(super) fn socket_addr(s: &At<String>, key: &str, p: &mut Problems) -> SocketAddr {
    s.value.parse::<SocketAddr>().unwrap_or_else(|_| {
        p.at(s.pos, key, format!("{:?} is not an IP:port listen address (e.g. 0.0.0.0:8080)", s.value));
        SocketAddr::from(([0, 0, 0, 0], 0))
    })
}

/// Reads the `listeners` list.
pub(super) fn listeners(node: Option<&Node>, deps: &[Declared], p: &mut Problems) -> Vec<ListenerConfig> {
    let items = node.and_then(|n| n.seq("listeners", p)).unwrap_or_default();
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let Some(l) = item.map(&format!("listeners[{i}]"), p) else { continue };
        let Some(listener) = listener(&l, deps, p) else { continue };
        if !names.insert(listener.name.clone()) {
            let at = l.get("name").map_or(l.pos, |n| n.pos);
            p.at(at, l.key("name"), format!("duplicate listener name {:?}", listener.name));
        }
        if listener.listen.port() != 0 && !addrs.insert(listener.listen) {
            let at = l.get("listen").map_or(l.pos, |n| n.pos);
            p.at(at, l.key("listen"), "two listeners on the same address");
        }
        listeners.push(listener);
    }
    listeners
}

/// Reads one listener; `None` when a required key is missing.
fn listener(l: &Map<'_>, deps: &[Declared], p: &mut Problems) -> Option<ListenerConfig> {
    let protocol = l.choice("protocol", ListenerProtocol::CHOICES, p).map_or(ListenerProtocol::Http, |v| v.value);
    let (foreign, other) = match protocol {
        ListenerProtocol::Http => (TCP_KEYS, "tcp"),
        ListenerProtocol::Tcp => (HTTP_KEYS, "http"),
    };
    let all: Vec<&str> = [KEYS, HTTP_KEYS, TCP_KEYS].concat();
    for k in l.keys() {
        if foreign.contains(&k.value.as_str()) {
            // Silently ignoring e.g. `reject:` on an HTTP listener would hide a mistake.
            p.at(k.pos, l.key(&k.value), format!("`{}` is a setting of `protocol: {other}` listeners only", k.value));
        }
    }
    l.deny_unknown(&all, p);

    let name = l.required_str("name", p);
    let listen = l.required_str("listen", p);
    let upstream = l.required_str("upstream", p);
    if let Some(name) = name.as_ref().filter(|n| !is_name(&n.value, NAME_CHARS)) {
        p.at(name.pos, l.key("name"), "must be non-empty and use only letters, digits, '_' and '-'");
    }
    let listen = listen.map(|a| socket_addr(&a, &l.key("listen"), p));
    let upstream = upstream.map(|u| {
        HostPort::parse(&u.value, None).unwrap_or_else(|e| {
            p.at(u.pos, l.key("upstream"), e.to_string());
            HostPort { host: String::new(), port: 0 }
        })
    });
    let needs = route::needs(l.get("needs"), deps, &l.key("needs"), p);
    let bypass = l.str_list("bypass", p).map(|b| b.value).unwrap_or_default();
    for b in &bypass {
        if !b.value.starts_with('/') {
            p.at(b.pos, l.key("bypass"), "a bypass path prefix must start with '/'");
        }
    }
    let routes = route::routes(&bypass, l.get("routes"), &needs, deps, &l.key("routes"), p);
    let positive = |k: &str, default: usize, p: &mut Problems| match l.int::<usize>(k, p) {
        Some(v) if v.value == 0 => {
            p.at(v.pos, l.key(k), "must be at least 1");
            default
        }
        Some(v) => v.value,
        None => default,
    };
    let max_header_bytes = positive("max_header_bytes", DEFAULT_MAX_HEADER_BYTES, p);
    if max_header_bytes < MIN_MAX_HEADER_BYTES
        && let Some(s) = l.get("max_header_bytes")
    {
        p.at(s.pos, l.key("max_header_bytes"), format!("must be at least {MIN_MAX_HEADER_BYTES}"));
    }
    let dur = |k: &str, default: Duration, p: &mut Problems| l.duration(k, p).map_or(default, |d| d.value);
    let flag = |k: &str, default: bool, p: &mut Problems| l.bool(k, p).map_or(default, |b| b.value);
    let max_connections = positive("max_connections", DEFAULT_MAX_CONNECTIONS, p);
    let http = HttpListenerConfig {
        x_forwarded_for: flag("x_forwarded_for", true, p),
        x_forwarded_proto: flag("x_forwarded_proto", true, p),
        via: flag("via", true, p),
        header_read_timeout: dur("header_read_timeout", DEFAULT_HEADER_READ_TIMEOUT, p),
        client_idle_timeout: dur("client_idle_timeout", DEFAULT_CLIENT_IDLE_TIMEOUT, p),
        upstream_connect_timeout: dur("upstream_connect_timeout", DEFAULT_UPSTREAM_CONNECT_TIMEOUT, p),
        upstream_response_timeout: dur("upstream_response_timeout", DEFAULT_UPSTREAM_RESPONSE_TIMEOUT, p),
        upstream_idle_timeout: dur("upstream_idle_timeout", DEFAULT_UPSTREAM_IDLE_TIMEOUT, p),
        upstream_pool_max_idle: l
            .int::<usize>("upstream_pool_max_idle", p)
            .map_or(DEFAULT_UPSTREAM_POOL_MAX_IDLE, |v| v.value),
        max_header_bytes,
        max_headers: positive("max_headers", DEFAULT_MAX_HEADERS, p),
        max_body_bytes: l.int::<u64>("max_body_bytes", p).map_or(0, |v| v.value),
        upstream_protocol: l
            .choice("upstream_protocol", &[("http1", UpstreamProtocol::Http1), ("h2c", UpstreamProtocol::H2c)], p)
            .map_or(UpstreamProtocol::Http1, |v| v.value),
        http2: flag("http2", true, p),
        http2_max_concurrent_streams: positive(
            "http2_max_concurrent_streams",
            DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS as usize,
            p,
        )
        .min(u32::MAX as usize) as u32,
        // The same bound as an HTTP/1.1 head unless set.
        http2_max_header_list_size: positive("http2_max_header_list_size", max_header_bytes, p).min(u32::MAX as usize)
            as u32,
        http2_max_pending_accept_reset_streams: positive(
            "http2_max_pending_accept_reset_streams",
            DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            p,
        ),
        http2_max_local_error_reset_streams: positive(
            "http2_max_local_error_reset_streams",
            DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS,
            p,
        ),
        abort_on_client_close: flag("abort_on_client_close", false, p),
    };

    let idle_timeout = dur("idle_timeout", DEFAULT_IDLE_TIMEOUT, p);
    let tcp = TcpListenerConfig {
        reject: l
            .choice("reject", &[("close", TcpReject::Close), ("reset", TcpReject::Reset)], p)
            .map_or(TcpReject::Close, |v| v.value),
        on_outage: l
            .choice("on_outage", &[("keep", TcpOnOutage::Keep), ("close_existing", TcpOnOutage::CloseExisting)], p)
            .map_or(TcpOnOutage::Keep, |v| v.value),
        admit_degraded: flag("admit_degraded", true, p),
        connect_timeout: dur("connect_timeout", DEFAULT_UPSTREAM_CONNECT_TIMEOUT, p),
        reject_delay: match l.duration("reject_delay", p) {
            Some(d) if d.value > MAX_REJECT_DELAY => {
                p.at(d.pos, l.key("reject_delay"), "must be at most 60s");
                MAX_REJECT_DELAY
            }
            Some(d) => d.value,
            None => Duration::ZERO,
        },
        reject_hold_max: l.int::<usize>("reject_hold_max", p).map_or(DEFAULT_REJECT_HOLD_MAX, |v| v.value),
    };
    Some(ListenerConfig {
        name: name?.value,
        protocol,
        listen: listen?,
        upstream: upstream?,
        needs,
        bypass: bypass.into_iter().map(|b| b.value).collect(),
        routes,
        max_connections,
        http,
        tcp,
        idle_timeout,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, ConfigError};
    use super::*;

    const L4: &str =
        "listeners:\n  - name: amqp\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: rabbitmq:5672\n";

    #[test]
    fn reject_delay_and_hold_max_default_to_an_immediate_close_and_load_when_set() {
        let c = Config::from_yaml(L4, Path::new("t.yaml")).unwrap();
        assert_eq!(c.listeners[0].tcp.reject_delay, Duration::ZERO);
        assert_eq!(c.listeners[0].tcp.reject_hold_max, DEFAULT_REJECT_HOLD_MAX);
        let yaml = format!("{L4}    reject_delay: 2s\n    reject_hold_max: 50\n");
        let c = Config::from_yaml(&yaml, Path::new("t.yaml")).unwrap();
        assert_eq!(c.listeners[0].tcp.reject_delay, Duration::from_secs(2));
        assert_eq!(c.listeners[0].tcp.reject_hold_max, 50);
    }

    #[test]
    fn a_reject_delay_over_a_minute_is_an_error_at_its_line() {
        let yaml = format!("{L4}    reject_delay: 2m\n");
        let Err(ConfigError::Invalid { problems, .. }) = Config::from_yaml(&yaml, Path::new("t.yaml")) else {
            panic!("a 2m reject_delay must be refused")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!((problems[0].key.as_str(), problems[0].line), ("listeners[0].reject_delay", 6), "{problems:?}");
    }

    #[test]
    fn reject_delay_is_a_tcp_listener_key_only() {
        let yaml =
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n    reject_delay: 1s\n";
        let Err(ConfigError::Invalid { problems, .. }) = Config::from_yaml(yaml, Path::new("t.yaml")) else {
            panic!("reject_delay on an HTTP listener must be refused")
        };
        assert_eq!(problems[0].key, "listeners[0].reject_delay", "{problems:?}");
    }
}
