//! `type: amqp` (alias `rabbitmq`): RabbitMQ over AMQP 0-9-1.
//!
//! One persistent connection per node. Each check opens a fresh channel,
//! passively declares the configured queues, publishes one empty unroutable
//! message (the only way an AMQP connection learns of a resource alarm: the
//! broker sends `connection.blocked` to publishing connections only) and
//! closes the channel. That round trip, bounded by the check deadline, is what
//! proves liveness: a frozen broker (which still completes the TCP handshake
//! but answers nothing) is a `read_timeout` within `timeout`, never a
//! heartbeat miss minutes later.
//!
//! The protocol subset is spoken here directly rather than through lapin, so
//! that every step has a deadline and a precise cause, the socket comes from
//! [`crate::net::connect`] (every resolved address tried), and no background I/O loop
//! outlives a cancelled check. See docs/amqp.md for the full rationale.
//!
//! Cancellation: the per-node work runs in a spawned task that owns the
//! node's connection slot, so a check future dropped by the monitor never
//! leaves a half-written frame or half-open handshake behind; the task
//! finishes (by the same deadline) and stores a consistent connection.
//!
//! Layout: `wire` is the AMQP 0-9-1 codec, `conn` one connection's state
//! machine; this module is the check itself (per-node handling and the
//! cluster verdict).

mod conn;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout_at};
use tracing::debug;

use self::conn::{Conn, Shared};
use super::tls::TlsSettings;
use super::{Cause, Check, CheckError, Details, NodeStatus, most_telling};
use crate::config::{DependencyConfig, HostPort, KindCtx, Pos, RawDependency, SecretSource, secret_source};

/// Keys an `amqp` dependency accepts besides the common ones.
pub(crate) const KEYS: &[&str] =
    &["url", "urls", "nodes", "require", "password_env", "password_file", "queues", "heartbeat"];

/// Default AMQP port.
const DEFAULT_PORT: u16 = 5672;
/// Default AMQPS port.
const DEFAULT_TLS_PORT: u16 = 5671;

/// How many nodes must pass for the dependency to be up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Require {
    /// At least one node (the default: clients can use any node).
    Any,
    /// More than half of the nodes.
    Quorum,
    /// Every node.
    All,
}

impl Require {
    /// The keyword as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Require::Any => "any",
            Require::Quorum => "quorum",
            Require::All => "all",
        }
    }

    /// How many of `total` nodes must be up.
    pub fn needed(self, total: usize) -> usize {
        match self {
            Require::Any => 1.min(total),
            Require::Quorum => total / 2 + 1,
            Require::All => total,
        }
    }
}

/// One broker node to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpNode {
    /// Where to connect.
    pub address: HostPort,
    /// Login user.
    pub user: String,
    /// Virtual host (decoded; `/` by default).
    pub vhost: String,
}

/// Settings of an `amqp` dependency.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// The nodes, from `url`, `urls` or `url` + `nodes`.
    pub nodes: Vec<AmqpNode>,
    /// Where the password comes from (`None`: the URI default `guest`, only valid for user `guest`).
    pub password: Option<SecretSource>,
    /// How many nodes must pass.
    pub require: Require,
    /// Queues that must exist (passive `queue.declare`).
    pub queues: Vec<String>,
    /// Heartbeat to negotiate, whole seconds (`None`: derived from the check schedule; 0 disables).
    pub heartbeat: Option<u16>,
    /// TLS for every node (`amqps://` or `tls: true`).
    pub tls: Option<TlsSettings>,
}

impl AmqpSettings {
    pub(crate) fn from_raw(d: &RawDependency, mut ctx: KindCtx<'_>) -> Option<Self> {
        let mut ok = true;
        let mut nodes = Vec::new();
        match (&d.url, &d.urls, &d.nodes) {
            (_, Some(urls), Some(_)) => {
                ctx.error(urls, "urls", "set `urls` or `nodes`, not both");
                ok = false;
            }
            (Some(url), Some(_), None) => {
                ctx.error(url, "url", "set `url` (optionally with `nodes`) or `urls`, not both");
                ok = false;
            }
            (None, None, None) => {
                ctx.missing("url");
                ok = false;
            }
            (None, Some(urls), None) => {
                if urls.value.is_empty() {
                    ctx.error(urls, "urls", "must list at least one amqp:// URL");
                    ok = false;
                }
                for u in &urls.value {
                    match parse_url(&u.value) {
                        Ok(n) => nodes.push(n),
                        Err(e) => {
                            ctx.error(u, "urls", e);
                            ok = false;
                        }
                    }
                }
            }
            (None, None, Some(n)) => {
                ctx.error(n, "nodes", "`nodes` needs `url` for the user and virtual host");
                ok = false;
            }
            (Some(url), None, list) => match parse_url(&url.value) {
                Err(e) => {
                    ctx.error(url, "url", e);
                    ok = false;
                }
                Ok(template) => match list {
                    None => nodes.push(template),
                    Some(list) => {
                        if list.value.is_empty() {
                            ctx.error(list, "nodes", "must list at least one host:port");
                            ok = false;
                        }
                        for n in &list.value {
                            match HostPort::parse(&n.value, Some(template.address.port)) {
                                Ok(address) => nodes.push(AmqpNode { address, ..template.clone() }),
                                Err(e) => {
                                    ctx.error(n, "nodes", e);
                                    ok = false;
                                }
                            }
                        }
                    }
                },
            },
        }
        let mut seen = std::collections::HashSet::new();
        for n in &nodes {
            if !seen.insert(n.address.clone()) {
                let span = d.urls.as_ref().or(d.nodes.as_ref());
                if let Some(s) = span {
                    ctx.error(
                        s,
                        if d.urls.is_some() { "urls" } else { "nodes" },
                        format!("{} is listed twice", n.address),
                    );
                }
                ok = false;
            }
        }

        let key = ctx.key("password_env");
        let password = secret_source(&d.password_env, &d.password_file, &key, ctx.problems);
        if password.is_none() && nodes.iter().any(|n| n.user != "guest") {
            let (pos, key) = (ctx.pos, ctx.key("password_env"));
            ctx.problems.at_pos(
                pos,
                key,
                "set password_env or password_file (only user guest defaults to password guest)",
            );
            ok = false;
        }

        let require = match &d.require {
            None => Require::Any,
            Some(r) => match r.value.as_str() {
                "any" => Require::Any,
                "quorum" => Require::Quorum,
                "all" => Require::All,
                other => {
                    ctx.error(r, "require", format!("expected any, quorum or all, found {other:?}"));
                    ok = false;
                    Require::Any
                }
            },
        };

        let mut queues = Vec::new();
        if let Some(q) = &d.queues {
            for name in &q.value {
                if name.value.is_empty() || name.value.len() > 255 {
                    ctx.error(name, "queues", "a queue name must be 1 to 255 bytes long");
                    ok = false;
                } else if !queues.contains(&name.value) {
                    queues.push(name.value.clone());
                }
            }
        }

        let heartbeat = match &d.heartbeat {
            None => None,
            Some(h) => {
                let d = h.value.0;
                if d.subsec_nanos() != 0 || d.as_secs() > u64::from(u16::MAX) {
                    ctx.error(h, "heartbeat", "must be whole seconds between 0s (disabled) and 65535s");
                    ok = false;
                    None
                } else {
                    Some(d.as_secs() as u16)
                }
            }
        };

        // One TLS setting for the dependency: its nodes are one cluster.
        let schemes: Vec<bool> = [&d.url]
            .into_iter()
            .flatten()
            .chain(d.urls.iter().flat_map(|u| u.value.iter()))
            .map(|u| is_amqps(&u.value))
            .collect();
        let by_scheme = schemes.iter().any(|t| *t);
        if by_scheme && !schemes.iter().all(|t| *t) {
            let at = d.urls.as_ref().map(|u| (Pos::from(u), "urls")).or(d.url.as_ref().map(|u| (Pos::from(u), "url")));
            if let Some((pos, k)) = at {
                let key = ctx.key(k);
                ctx.problems.at_pos(pos, key, "mixes amqp:// and amqps://; one cluster uses one scheme");
            }
            ok = false;
        }
        let tls = TlsSettings::from_raw(d, &mut ctx, by_scheme);
        ok &= tls.is_ok();
        ok.then_some(AmqpSettings { nodes, password, require, queues, heartbeat, tls: tls.ok()? })
    }
}

/// Whether a URL asks for TLS.
fn is_amqps(s: &str) -> bool {
    s.trim().starts_with("amqps://")
}

/// Parses `amqp[s]://[user@]host[:port][/vhost]`; a password in the URL is refused.
fn parse_url(s: &str) -> Result<AmqpNode, String> {
    let s = s.trim();
    let (rest, default_port) = if let Some(r) = s.strip_prefix("amqp://") {
        (r, DEFAULT_PORT)
    } else if let Some(r) = s.strip_prefix("amqps://") {
        (r, DEFAULT_TLS_PORT)
    } else {
        return Err("must be an amqp:// or amqps:// URL (amqp://user@host:5672/vhost)".into());
    };
    if rest.contains('?') || rest.contains('#') {
        return Err("query parameters are not supported; use the dependency's keys (e.g. `heartbeat`)".into());
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let user = match userinfo {
        None => "guest".to_string(),
        Some(u) if u.contains(':') => {
            return Err("a password in the URL is not allowed (it would be logged and shown); \
                        use password_env or password_file"
                .into());
        }
        Some(u) => percent_decode(u)?,
    };
    if user.is_empty() {
        return Err("empty user name".into());
    }
    if hostport.is_empty() {
        return Err("the URL has no host".into());
    }
    let address = HostPort::parse(hostport, Some(default_port))?;
    // Both "amqp://h" and "amqp://h/" mean the default vhost "/", as most
    // clients treat it; another vhost is percent-encoded ("/%2f" is "/" too).
    let vhost = match path {
        None | Some("") => "/".to_string(),
        Some(p) if p.contains('/') => return Err("the vhost must be one path segment (encode '/' as %2f)".into()),
        Some(p) => percent_decode(p)?,
    };
    if vhost.len() > 255 {
        return Err("the vhost name is longer than 255 bytes".into());
    }
    Ok(AmqpNode { address, user, vhost })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("invalid %-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "%-escapes do not decode to UTF-8".to_string())
}

// === One node ===

/// How long a connection still waiting for `connection.start` is kept for
/// the next check; after that a fresh one is opened (the address may have
/// changed).
const PENDING_MAX_AGE: Duration = Duration::from_secs(30);

/// A connection whose broker accepted the TCP connection but has not sent
/// `connection.start` (frozen or overloaded). The next check keeps waiting
/// on it instead of opening another, so a long freeze leaves one waiting
/// connection, not one per check, each of which the broker would log as
/// "client unexpectedly closed" when it thaws.
struct Pending {
    conn: Conn,
    since: Instant,
}

/// A node's connection, shared with the task probing it.
#[derive(Default)]
struct Slot {
    conn: Option<Conn>,
    pending: Option<Pending>,
}

/// Opens a connection: resumes a pending one, or connects afresh (also when
/// the resumed one turns out dead).
async fn open(
    pending: &mut Option<Pending>,
    node: &AmqpNode,
    shared: &Shared,
    deadline: Instant,
) -> Result<Conn, CheckError> {
    let mut resumed = pending.take().filter(|p| p.since.elapsed() < PENDING_MAX_AGE);
    loop {
        let was_resumed = resumed.is_some();
        let (conn, since) = match resumed.take() {
            Some(p) => (p.conn, p.since),
            None => (Conn::connect(node, shared, deadline).await?, Instant::now()),
        };
        match conn.handshake(node, shared, deadline).await {
            Ok(c) => return Ok(c),
            Err((e, Some(c))) => {
                *pending = Some(Pending { conn: c, since });
                return Err(e);
            }
            Err((e, None)) if was_resumed && e.cause == Cause::Reset => {
                debug!(node = %node.address, error = %e, "waiting amqp connection died; connecting afresh");
            }
            Err((e, None)) => return Err(e),
        }
    }
}

/// Probes one node: reuses its connection (reconnecting once if the broker
/// closed it while idle) and runs the round trip.
async fn probe(
    slot: Arc<tokio::sync::Mutex<Slot>>,
    node: Arc<AmqpNode>,
    shared: Arc<Shared>,
    deadline: Instant,
) -> (Result<(), CheckError>, Option<String>) {
    // A previous probe that outlived its (dropped) check still holds the slot until its own deadline.
    let Ok(mut slot) = timeout_at(deadline, slot.lock_owned()).await else {
        return (Err(CheckError::new(Cause::ReadTimeout, "the previous check of this node is still running")), None);
    };
    let mut existing = slot.conn.take();
    if let Some(c) = existing.as_mut() {
        c.drain(deadline).await;
        if c.dead {
            debug!(node = %node.address, "amqp connection closed while idle; reconnecting");
            existing = None;
        } else if c.dirty {
            existing.take().expect("checked above").abandon();
        }
    }
    let mut retried = false;
    loop {
        let reused = existing.is_some();
        let mut conn = match existing.take() {
            Some(c) => c,
            None => match open(&mut slot.pending, &node, &shared, deadline).await {
                Ok(c) => c,
                Err(e) => return (Err(e), None),
            },
        };
        let version = conn.version.clone();
        match conn.round_trip(&shared.queues, deadline).await {
            Ok(()) => {
                slot.conn = Some(conn);
                return (Ok(()), version);
            }
            Err(e) if reused && conn.dead && !retried && matches!(e.cause, Cause::Reset | Cause::ServerError) => {
                // An idle connection the broker dropped (EOF, reset,
                // CONNECTION_FORCED) is not an outage; judge a fresh one. A
                // timeout is not retried: the broker is there but silent.
                debug!(node = %node.address, error = %e, "amqp connection went stale; reconnecting once");
                retried = true;
            }
            Err(e) => {
                if conn.dead {
                    drop(conn);
                } else if conn.dirty {
                    conn.abandon();
                } else {
                    slot.conn = Some(conn);
                }
                return (Err(e), version);
            }
        }
    }
}

struct Node {
    target: Arc<AmqpNode>,
    slot: Arc<tokio::sync::Mutex<Slot>>,
    status: NodeStatus,
    version: Option<String>,
}

/// The `amqp` check.
pub struct AmqpCheck {
    nodes: Vec<Node>,
    require: Require,
    shared: Arc<Shared>,
}

impl AmqpCheck {
    /// Builds the check.
    pub fn new(settings: AmqpSettings, dep: &DependencyConfig) -> Self {
        let heartbeat = settings.heartbeat.unwrap_or_else(|| default_heartbeat(dep));
        let shared = Arc::new(Shared {
            password: settings.password,
            queues: settings.queues,
            heartbeat,
            connection_name: format!("healthgate {}", dep.name),
            tls: settings.tls,
        });
        let nodes = settings
            .nodes
            .into_iter()
            .map(|n| Node {
                status: NodeStatus { address: n.address.to_string(), up: false, cause: None, message: None },
                target: Arc::new(n),
                slot: Arc::default(),
                version: None,
            })
            .collect();
        AmqpCheck { nodes, require: settings.require, shared }
    }

    /// The heartbeat this check negotiates, in seconds.
    pub fn heartbeat(&self) -> u16 {
        self.shared.heartbeat
    }
}

/// The default heartbeat: the longest gap between two checks (interval with
/// jitter, plus the timeout), rounded up to whole seconds. Our own check
/// traffic then always arrives within one heartbeat, so the broker never
/// drops an idle check connection, yet it notices a vanished healthgate in
/// about twice that. Liveness of the broker is proven by the round trip, not
/// by heartbeats.
fn default_heartbeat(dep: &DependencyConfig) -> u16 {
    let gap = dep.interval.max(dep.interval_down).mul_f64(1.0 + dep.jitter) + dep.timeout;
    gap.as_secs_f64().ceil().clamp(1.0, f64::from(u16::MAX)) as u16
}

/// The cluster verdict from each node's result.
fn verdict(require: Require, results: &[(&str, &Result<(), CheckError>)]) -> Result<(), CheckError> {
    let total = results.len();
    let up = results.iter().filter(|(_, r)| r.is_ok()).count();
    if up >= require.needed(total) {
        return Ok(());
    }
    let failed: Vec<(&str, &CheckError)> =
        results.iter().filter_map(|(a, r)| r.as_ref().err().map(|e| (*a, e))).collect();
    let worst = most_telling(failed.iter().map(|(_, e)| *e)).expect("a failing verdict has a failed node");
    let worst = failed[worst].1;
    if total == 1 {
        return Err(worst.clone());
    }
    let detail = failed.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; ");
    Err(CheckError::new(
        worst.cause,
        format!(
            "{up} of {total} nodes up, {} required (require: {}); {detail}",
            require.needed(total),
            require.as_str()
        ),
    ))
}

impl Check for AmqpCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        // Plain spawned tasks, not a JoinSet: a check dropped by the monitor
        // must leave its probes running (detached) to their own deadline, so
        // no frame is left half-written. All run at once, so waiting for them
        // in turn against one deadline waits no longer than for the slowest.
        let handles: Vec<_> = self
            .nodes
            .iter()
            .map(|n| tokio::spawn(probe(n.slot.clone(), n.target.clone(), self.shared.clone(), deadline)))
            .collect();
        let mut results = Vec::with_capacity(handles.len());
        for (handle, node) in handles.into_iter().zip(self.nodes.iter_mut()) {
            // The tasks bound themselves by `deadline`; the margin only covers scheduling.
            let r = match timeout_at(deadline + Duration::from_millis(100), handle).await {
                Ok(Ok((r, version))) => {
                    if version.is_some() {
                        node.version = version;
                    }
                    r
                }
                Ok(Err(e)) => Err(CheckError::new(Cause::ServerError, format!("check task failed: {e}"))),
                Err(_) => Err(CheckError::new(Cause::ReadTimeout, "no result in time")),
            };
            node.status.up = r.is_ok();
            node.status.cause = r.as_ref().err().map(|e| e.cause);
            node.status.message = r.as_ref().err().map(|e| e.message.clone());
            results.push(r);
        }
        let named: Vec<(&str, &Result<(), CheckError>)> =
            self.nodes.iter().map(|n| n.status.address.as_str()).zip(results.iter()).collect();
        verdict(self.require, &named)
    }

    fn details(&self) -> Details {
        let server_version =
            self.nodes.iter().filter(|n| n.status.up).chain(self.nodes.iter()).find_map(|n| n.version.clone());
        Details { server_version, current_master: None, nodes: self.nodes.iter().map(|n| n.status.clone()).collect() }
    }

    async fn close(&mut self, deadline: Instant) {
        // A JoinSet: dropping this future aborts the closes, as it should.
        let mut closes = tokio::task::JoinSet::new();
        for n in &self.nodes {
            let slot = n.slot.clone();
            closes.spawn(async move {
                if let Ok(mut slot) = timeout_at(deadline, slot.lock_owned()).await {
                    slot.pending = None;
                    if let Some(conn) = slot.conn.take() {
                        conn.close(deadline).await;
                    }
                }
            });
        }
        while closes.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings(dep_yaml: &str) -> Result<(AmqpSettings, DependencyConfig), String> {
        let yaml = format!(
            "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\ndependencies:\n  - name: mq\n    type: rabbitmq\n{dep_yaml}"
        );
        match crate::config::Config::from_yaml(&yaml, Path::new("t.yaml")) {
            Ok(c) => {
                let dep = c.dependencies[0].clone();
                match &dep.kind {
                    crate::config::DependencyKind::Amqp(s) => Ok((s.clone(), dep)),
                    _ => panic!("not amqp"),
                }
            }
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn url_gives_user_host_port_and_vhost() {
        let n = parse_url("amqp://app@mq.local:5673/prod").unwrap();
        assert_eq!(
            n,
            AmqpNode {
                address: HostPort { host: "mq.local".into(), port: 5673 },
                user: "app".into(),
                vhost: "prod".into()
            }
        );
        let n = parse_url("amqp://[::1]").unwrap();
        assert_eq!(
            (n.address.host.as_str(), n.address.port, n.user.as_str(), n.vhost.as_str()),
            ("::1", 5672, "guest", "/")
        );
        assert_eq!(parse_url("amqp://u@h/").unwrap().vhost, "/");
        assert_eq!(parse_url("amqp://u@h/%2f").unwrap().vhost, "/");
        assert_eq!(parse_url("amqp://u%40x@h/a%20b").unwrap().user, "u@x");
    }

    #[test]
    fn password_in_url_and_query_are_config_errors() {
        assert!(parse_url("amqp://u:secret@h/").unwrap_err().contains("password_env"));
        assert!(parse_url("amqp://u@h/?heartbeat=5").unwrap_err().contains("query"));
        assert!(parse_url("http://h/").is_err());
        let err = settings("    url: amqp://u:secret@h/\n    password_env: P\n").unwrap_err();
        assert!(err.contains("dependencies[0].url") && !err.contains("secret@"), "{err}");
    }

    #[test]
    fn amqps_url_turns_tls_on_with_port_5671() {
        let (s, _) = settings("    url: amqps://u@h/\n    password_env: P\n").unwrap();
        assert!(s.tls.is_some());
        assert_eq!(s.nodes[0].address.port, 5671);
        let (s, _) = settings("    url: amqp://u@h/\n    password_env: P\n    tls: true\n").unwrap();
        assert!(s.tls.is_some());
        let err = settings("    urls: [amqps://u@a/, amqp://u@b/]\n    password_env: P\n").unwrap_err();
        assert!(err.contains("mixes"), "{err}");
    }

    #[test]
    fn a_user_other_than_guest_needs_a_password_source() {
        let err = settings("    url: amqp://app@h/\n").unwrap_err();
        assert!(err.contains("password_env"), "{err}");
        let (s, _) = settings("    url: amqp://h/\n").unwrap();
        assert_eq!((s.nodes[0].user.as_str(), s.password.is_none()), ("guest", true));
    }

    #[test]
    fn nodes_take_user_and_vhost_from_url_and_require_parses() {
        let (s, _) = settings(
            "    url: amqp://app@x:5673/v\n    password_env: P\n    nodes: [a, 'b:1', '[::1]']\n    require: quorum\n    queues: [q1, q1, q2]\n",
        )
        .unwrap();
        let addrs: Vec<String> = s.nodes.iter().map(|n| n.address.to_string()).collect();
        assert_eq!(addrs, ["a:5673", "b:1", "[::1]:5673"]);
        assert!(s.nodes.iter().all(|n| n.user == "app" && n.vhost == "v"));
        assert_eq!(s.require, Require::Quorum);
        assert_eq!(s.queues, ["q1", "q2"]);
        let err = settings("    urls: [amqp://h1/, amqp://h2/]\n    require: most\n").unwrap_err();
        assert!(err.contains("dependencies[0].require"), "{err}");
        let err = settings("    urls: [amqp://h1/, amqp://h1/]\n").unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn heartbeat_must_be_whole_seconds_and_defaults_to_the_check_gap() {
        assert!(settings("    url: amqp://h/\n    heartbeat: 1500ms\n").unwrap_err().contains("whole seconds"));
        let (s, dep) = settings("    url: amqp://h/\n    heartbeat: 0s\n").unwrap();
        assert_eq!(s.heartbeat, Some(0));
        assert_eq!(AmqpCheck::new(s, &dep).heartbeat(), 0);
        // interval 2s * 1.1 jitter + 1s timeout = 3.2s → 4s.
        let (s, dep) = settings("    url: amqp://h/\n").unwrap();
        assert_eq!(AmqpCheck::new(s, &dep).heartbeat(), 4);
    }

    #[test]
    fn require_counts() {
        assert_eq!([Require::Any, Require::Quorum, Require::All].map(|r| r.needed(3)), [1, 2, 3]);
        assert_eq!(Require::Quorum.needed(2), 2);
        assert_eq!(Require::Quorum.needed(1), 1);
    }

    #[test]
    fn verdict_picks_the_most_informative_cause() {
        let refused = Err(CheckError::new(Cause::Refused, "r"));
        let auth = Err(CheckError::new(Cause::Auth, "a"));
        let ok = Ok(());
        assert!(verdict(Require::Any, &[("a", &refused), ("b", &ok)]).is_ok());
        let e = verdict(Require::All, &[("a", &refused), ("b", &ok)]).unwrap_err();
        assert_eq!(e.cause, Cause::Refused);
        assert!(e.message.starts_with("1 of 2 nodes up, 2 required"), "{e}");
        let e = verdict(Require::Any, &[("a", &refused), ("b", &auth)]).unwrap_err();
        assert_eq!(e.cause, Cause::Auth);
        assert_eq!(verdict(Require::Any, &[("a", &refused)]).unwrap_err(), CheckError::new(Cause::Refused, "r"));
    }

    async fn check_against(port: u16) -> CheckError {
        let (s, dep) = settings(&format!("    url: amqp://127.0.0.1:{port}/\n")).unwrap();
        let mut c = AmqpCheck::new(s, &dep);
        let err = c.check(Instant::now() + Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(c.details().nodes.len(), 1);
        assert_eq!(c.details().nodes[0].cause, Some(err.cause));
        err
    }

    /// That the wait ends at the deadline itself is proven without a clock in
    /// `conn::tests`; here the whole check reports it, node details included.
    #[tokio::test]
    async fn silent_server_is_a_read_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        assert_eq!(check_against(port).await.cause, Cause::ReadTimeout);
    }

    #[tokio::test]
    async fn http_server_is_a_protocol_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 8];
            let _ = s.read_exact(&mut b).await;
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let err = check_against(port).await;
        assert_eq!(err.cause, Cause::Protocol, "{err}");
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert_eq!(check_against(port).await.cause, Cause::Refused);
    }
}
