//! `type: amqp` (alias `rabbitmq`): RabbitMQ over AMQP 0-9-1.
//!
//! One persistent connection per node. Each check opens a fresh channel,
//! passively declares the configured queues, publishes one empty unroutable
//! message (the only way an AMQP connection learns of a resource alarm: the
//! broker sends `connection.blocked` to publishing connections only) and
//! closes the channel. That round trip, bounded by the check deadline, is what
//! proves liveness: a frozen broker is a `read_timeout` within `timeout`, never
//! a heartbeat miss minutes later (seed 002).
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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::io::{Phase, io_error};
use super::tls::{self, Stream, TlsSettings};
use super::{Cause, Check, CheckError, Details, NodeStatus};
use crate::config::{DependencyConfig, HostPort, KindCtx, Pos, RawDependency, SecretSource, secret_source};

/// Keys an `amqp` dependency accepts besides the common ones.
pub(crate) const KEYS: &[&str] =
    &["url", "urls", "nodes", "require", "password_env", "password_file", "queues", "heartbeat"];

/// Default AMQP port.
const DEFAULT_PORT: u16 = 5672;
/// Default AMQPS port.
const DEFAULT_TLS_PORT: u16 = 5671;

/// How long a connection abandoned after a failure may take to close
/// cleanly in the background before its socket is simply dropped. Long, on
/// purpose: a frozen broker reads our `connection.close` only when it thaws,
/// and a socket we closed before that makes it log an abrupt close.
const ABANDON_BOUND: Duration = Duration::from_secs(30);

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

// === Wire format (the AMQP 0-9-1 subset healthgate speaks) ===

mod wire {
    //! Frames and the handful of methods a health check needs.

    pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
    pub const FRAME_METHOD: u8 = 1;
    pub const FRAME_HEADER: u8 = 2;
    pub const FRAME_BODY: u8 = 3;
    pub const FRAME_HEARTBEAT: u8 = 8;
    pub const FRAME_END: u8 = 0xCE;
    /// Largest frame accepted from a server (its frame_max is 128 KiB by default).
    pub const MAX_FRAME: usize = 4 * 1024 * 1024;
    /// frame_max healthgate proposes (our frames are tiny).
    pub const FRAME_MAX: u32 = 131_072;

    /// One frame as received.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Frame {
        pub kind: u8,
        pub channel: u16,
        pub payload: Vec<u8>,
    }

    /// Tries to cut one frame off the front of `buf`; `Ok(None)` means more bytes are needed.
    pub fn parse_frame(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
        if buf.len() >= 4 && &buf[..4] == b"AMQP" {
            return Err(if buf.len() >= 8 {
                format!(
                    "the server does not speak AMQP 0-9-1 (it answered with protocol header {}-{}-{})",
                    buf[5], buf[6], buf[7]
                )
            } else {
                "the server rejected the AMQP 0-9-1 protocol header".into()
            });
        }
        if buf.is_empty() {
            return Ok(None);
        }
        if ![FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT].contains(&buf[0]) {
            let head: String =
                buf.iter().take(16).map(|&c| if c.is_ascii_graphic() || c == b' ' { c as char } else { '.' }).collect();
            return Err(format!("not an AMQP server (unexpected bytes {head:?})"));
        }
        if buf.len() < 7 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        if size > MAX_FRAME {
            return Err(format!("frame of {size} bytes is larger than any this check expects"));
        }
        if buf.len() < 7 + size + 1 {
            return Ok(None);
        }
        if buf[7 + size] != FRAME_END {
            return Err("frame does not end with the frame-end octet".into());
        }
        let frame =
            Frame { kind: buf[0], channel: u16::from_be_bytes([buf[1], buf[2]]), payload: buf[7..7 + size].to_vec() };
        buf.drain(..8 + size);
        Ok(Some(frame))
    }

    /// Appends a frame.
    pub fn frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
        out.push(kind);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out.push(FRAME_END);
    }

    /// Builds method arguments.
    #[derive(Default)]
    pub struct Args(pub Vec<u8>);

    impl Args {
        pub fn method(class: u16, method: u16) -> Args {
            let mut a = Args::default();
            a.u16(class).u16(method);
            a
        }
        pub fn u8(&mut self, v: u8) -> &mut Self {
            self.0.push(v);
            self
        }
        pub fn u16(&mut self, v: u16) -> &mut Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        /// A short string; callers pass names already validated to fit 255 bytes.
        pub fn short(&mut self, s: &str) -> &mut Self {
            let b = &s.as_bytes()[..s.len().min(255)];
            self.0.push(b.len() as u8);
            self.0.extend_from_slice(b);
            self
        }
        pub fn long(&mut self, b: &[u8]) -> &mut Self {
            self.u32(b.len() as u32);
            self.0.extend_from_slice(b);
            self
        }
        /// A field table of string, boolean and nested-table values.
        pub fn table(&mut self, fields: &[(&str, Value)]) -> &mut Self {
            let mut t = Args::default();
            for (k, v) in fields {
                t.short(k);
                match v {
                    Value::Str(s) => {
                        t.u8(b'S').long(s.as_bytes());
                    }
                    Value::Bool(b) => {
                        t.u8(b't').u8(u8::from(*b));
                    }
                    Value::Table(inner) => {
                        let inner: Vec<(&str, Value)> = inner.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                        t.u8(b'F').table(&inner);
                    }
                    Value::Other => {
                        t.u8(b'V');
                    }
                }
            }
            self.long(&t.0)
        }
    }

    /// A decoded field value (only what a check needs; the rest is skipped).
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Str(String),
        Bool(bool),
        Table(Vec<(String, Value)>),
        Other,
    }

    /// Reads method arguments.
    pub struct Reader<'a> {
        b: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        pub fn new(b: &'a [u8]) -> Self {
            Reader { b, pos: 0 }
        }
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("truncated method frame")?;
            let s = &self.b[self.pos..end];
            self.pos = end;
            Ok(s)
        }
        pub fn u8(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }
        pub fn u16(&mut self) -> Result<u16, String> {
            let s = self.take(2)?;
            Ok(u16::from_be_bytes([s[0], s[1]]))
        }
        pub fn u32(&mut self) -> Result<u32, String> {
            let s = self.take(4)?;
            Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        }
        pub fn short(&mut self) -> Result<String, String> {
            let n = self.u8()? as usize;
            Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
        }
        pub fn long(&mut self) -> Result<Vec<u8>, String> {
            let n = self.u32()? as usize;
            Ok(self.take(n)?.to_vec())
        }
        pub fn table(&mut self) -> Result<Vec<(String, Value)>, String> {
            let n = self.u32()? as usize;
            let mut r = Reader::new(self.take(n)?);
            let mut out = Vec::new();
            while r.pos < r.b.len() {
                let k = r.short()?;
                let v = r.value()?;
                out.push((k, v));
            }
            Ok(out)
        }
        /// One typed field value (RabbitMQ's type letters).
        fn value(&mut self) -> Result<Value, String> {
            Ok(match self.u8()? {
                b't' => Value::Bool(self.u8()? != 0),
                b'b' | b'B' => {
                    self.take(1)?;
                    Value::Other
                }
                b's' | b'u' => {
                    self.take(2)?;
                    Value::Other
                }
                b'I' | b'i' | b'f' => {
                    self.take(4)?;
                    Value::Other
                }
                b'l' | b'L' | b'd' | b'T' => {
                    self.take(8)?;
                    Value::Other
                }
                b'D' => {
                    self.take(5)?;
                    Value::Other
                }
                b'S' => Value::Str(String::from_utf8_lossy(&self.long()?).into_owned()),
                b'x' => {
                    self.long()?;
                    Value::Other
                }
                b'A' => {
                    let n = self.u32()? as usize;
                    let mut r = Reader::new(self.take(n)?);
                    while r.pos < r.b.len() {
                        r.value()?;
                    }
                    Value::Other
                }
                b'F' => Value::Table(self.table()?),
                b'V' => Value::Other,
                t => return Err(format!("unknown field type {:?} in a table", t as char)),
            })
        }
    }

    /// The methods a check receives.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Method {
        Start { version: Option<String>, product: Option<String>, mechanisms: String },
        Secure,
        Tune { channel_max: u16, frame_max: u32, heartbeat: u16 },
        OpenOk,
        Close { code: u16, text: String, class: u16, method: u16 },
        CloseOk,
        Blocked(String),
        Unblocked,
        ChannelOpenOk,
        ChannelClose { code: u16, text: String },
        ChannelCloseOk,
        DeclareOk { messages: u32, consumers: u32 },
        Other(u16, u16),
    }

    impl Method {
        pub fn parse(payload: &[u8]) -> Result<Method, String> {
            let mut r = Reader::new(payload);
            let (class, method) = (r.u16()?, r.u16()?);
            Ok(match (class, method) {
                (10, 10) => {
                    let _ = (r.u8()?, r.u8()?);
                    let props = r.table()?;
                    let get = |k: &str| {
                        props.iter().find_map(|(n, v)| match v {
                            Value::Str(s) if n == k => Some(s.clone()),
                            _ => None,
                        })
                    };
                    let mechanisms = String::from_utf8_lossy(&r.long()?).into_owned();
                    Method::Start { version: get("version"), product: get("product"), mechanisms }
                }
                (10, 20) => Method::Secure,
                (10, 30) => Method::Tune { channel_max: r.u16()?, frame_max: r.u32()?, heartbeat: r.u16()? },
                (10, 41) => Method::OpenOk,
                (10, 50) => Method::Close { code: r.u16()?, text: r.short()?, class: r.u16()?, method: r.u16()? },
                (10, 51) => Method::CloseOk,
                (10, 60) => Method::Blocked(r.short()?),
                (10, 61) => Method::Unblocked,
                (20, 11) => Method::ChannelOpenOk,
                (20, 40) => Method::ChannelClose { code: r.u16()?, text: r.short()? },
                (20, 41) => Method::ChannelCloseOk,
                (50, 11) => {
                    let _queue = r.short()?;
                    Method::DeclareOk { messages: r.u32()?, consumers: r.u32()? }
                }
                (c, m) => Method::Other(c, m),
            })
        }

        /// The AMQP name, for messages.
        pub fn name(&self) -> String {
            match self {
                Method::Start { .. } => "connection.start".into(),
                Method::Secure => "connection.secure".into(),
                Method::Tune { .. } => "connection.tune".into(),
                Method::OpenOk => "connection.open-ok".into(),
                Method::Close { .. } => "connection.close".into(),
                Method::CloseOk => "connection.close-ok".into(),
                Method::Blocked(_) => "connection.blocked".into(),
                Method::Unblocked => "connection.unblocked".into(),
                Method::ChannelOpenOk => "channel.open-ok".into(),
                Method::ChannelClose { .. } => "channel.close".into(),
                Method::ChannelCloseOk => "channel.close-ok".into(),
                Method::DeclareOk { .. } => "queue.declare-ok".into(),
                Method::Other(c, m) => format!("method {c}.{m}"),
            }
        }
    }
}

use wire::{Args, Frame, Method, Value};

/// What a reply code from `connection.close` / `channel.close` means for a check.
fn classify_close(code: u16, opening: bool) -> Cause {
    match code {
        403 => Cause::Auth,
        // NOT_ALLOWED / INVALID_PATH while opening: the vhost is missing or the user may not use it.
        530 | 402 if opening => Cause::Vhost,
        404 => Cause::NotFound,
        501..=505 | 540 => Cause::Protocol,
        _ => Cause::ServerError,
    }
}

// === One connection ===

/// Static facts every node's probe needs.
struct Shared {
    password: Option<SecretSource>,
    queues: Vec<String>,
    heartbeat: u16,
    connection_name: String,
    tls: Option<TlsSettings>,
}

/// A connection to one node, after `connection.open-ok`.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    channel_max: u16,
    next_channel: u16,
    /// `Some(reason)` between `connection.blocked` and `connection.unblocked`.
    blocked: Option<String>,
    /// The connection can no longer be used (EOF, reset, closed by the broker).
    dead: bool,
    /// An exchange is half done (a timeout): the connection must be abandoned.
    dirty: bool,
    /// Ended cleanly; nothing left to do on drop.
    closed: bool,
    /// `connection.open-ok` received (a close before it is about login or vhost).
    opened: bool,
    /// When the broker last sent anything (heartbeats included).
    last_rx: Instant,
    /// The negotiated heartbeat in seconds (0: none).
    heartbeat: u16,
    version: Option<String>,
}

impl Conn {
    /// Connects (every resolved address) and sends the protocol header, by `deadline`.
    async fn connect(node: &AmqpNode, shared: &Shared, deadline: Instant) -> Result<Conn, CheckError> {
        let (stream, _) = tls::connect(&node.address, shared.tls.as_ref(), deadline).await?;
        let mut c = Conn {
            stream,
            buf: Vec::with_capacity(512),
            channel_max: 2047,
            next_channel: 1,
            blocked: None,
            dead: false,
            dirty: true,
            closed: false,
            opened: false,
            last_rx: Instant::now(),
            heartbeat: shared.heartbeat,
            version: None,
        };
        c.write(wire::PROTOCOL_HEADER, deadline, "send protocol header").await?;
        Ok(c)
    }

    /// Waits for `connection.start`, logs in and opens the vhost, by
    /// `deadline`. When the broker has not said a word yet, the connection
    /// is handed back so the next check can keep waiting on it.
    async fn handshake(
        mut self,
        node: &AmqpNode,
        shared: &Shared,
        deadline: Instant,
    ) -> Result<Conn, (CheckError, Option<Conn>)> {
        let start = match self.recv_method(0, deadline, "connection.start").await {
            Ok(m) => m,
            Err(e) if e.cause == Cause::ReadTimeout && self.buf.is_empty() && !self.dead => {
                return Err((e, Some(self)));
            }
            Err(e) => return Err((e, None)),
        };
        match self.login(start, node, shared, deadline).await {
            Ok(()) => Ok(self),
            Err(e) => Err((e, None)),
        }
    }

    /// The handshake after `connection.start`.
    async fn login(
        &mut self,
        start: Method,
        node: &AmqpNode,
        shared: &Shared,
        deadline: Instant,
    ) -> Result<(), CheckError> {
        let c = self;
        let (version, product, mechanisms) = match start {
            Method::Start { version, product, mechanisms } => (version, product, mechanisms),
            m => return Err(c.unexpected(&m, "connection.start")),
        };
        c.version = version.map(|v| match product {
            Some(p) if p != "RabbitMQ" => format!("{p} {v}"),
            _ => v,
        });
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            return Err(CheckError::new(
                Cause::Protocol,
                format!("the broker offers no PLAIN login (it offers {mechanisms:?})"),
            ));
        }
        let password = match &shared.password {
            Some(src) => src.read().map_err(|e| CheckError::new(Cause::Config, e))?.expose().to_string(),
            None => "guest".to_string(),
        };
        let mut response = Vec::with_capacity(2 + node.user.len() + password.len());
        response.push(0);
        response.extend_from_slice(node.user.as_bytes());
        response.push(0);
        response.extend_from_slice(password.as_bytes());
        let capabilities = vec![
            ("authentication_failure_close".to_string(), Value::Bool(true)),
            ("connection.blocked".to_string(), Value::Bool(true)),
        ];
        let mut start_ok = Args::method(10, 11);
        start_ok
            .table(&[
                ("product", Value::Str("healthgate".into())),
                ("version", Value::Str(env!("CARGO_PKG_VERSION").into())),
                ("connection_name", Value::Str(shared.connection_name.clone())),
                ("capabilities", Value::Table(capabilities)),
            ])
            .short("PLAIN")
            .long(&response)
            .short("en_US");
        c.send_method(0, &start_ok, deadline, "send connection.start-ok").await?;
        let (channel_max, frame_max) = match c.recv_method(0, deadline, "connection.tune").await? {
            Method::Tune { channel_max, frame_max, .. } => (channel_max, frame_max),
            Method::Secure => {
                return Err(CheckError::new(
                    Cause::Protocol,
                    "the broker asked for a SASL challenge PLAIN does not have",
                ));
            }
            m => return Err(c.unexpected(&m, "connection.tune")),
        };
        // 0 means "no limit" for both.
        c.channel_max = if channel_max == 0 { 2047 } else { channel_max.min(2047) };
        let frame_max = if frame_max == 0 { wire::FRAME_MAX } else { frame_max.min(wire::FRAME_MAX) };
        let mut tune_ok = Args::method(10, 31);
        tune_ok.u16(c.channel_max).u32(frame_max).u16(shared.heartbeat);
        let mut open = Args::method(10, 40);
        open.short(&node.vhost).short("").u8(0);
        let mut out = Vec::new();
        wire::frame(&mut out, wire::FRAME_METHOD, 0, &tune_ok.0);
        wire::frame(&mut out, wire::FRAME_METHOD, 0, &open.0);
        c.write(&out, deadline, "send connection.open").await?;
        match c.recv_method(0, deadline, "connection.open-ok").await? {
            Method::OpenOk => {}
            m => return Err(c.unexpected(&m, "connection.open-ok")),
        }
        c.opened = true;
        c.dirty = false;
        Ok(())
    }

    /// One liveness round trip: channel.open, passive declares, an empty
    /// unroutable publish (alarm detection), channel.close.
    async fn round_trip(&mut self, queues: &[String], deadline: Instant) -> Result<(), CheckError> {
        if let Some(reason) = &self.blocked {
            // A blocked connection is not read by the broker, so no round trip
            // is possible; its heartbeats still arrive, and their absence means
            // the broker died or froze while blocked.
            let silent = self.last_rx.elapsed();
            if self.heartbeat > 0 && silent > Duration::from_secs(2 * u64::from(self.heartbeat)) {
                self.dead = true;
                return Err(CheckError::new(
                    Cause::ReadTimeout,
                    format!("blocked connection silent for {}s (no heartbeats)", silent.as_secs()),
                ));
            }
            return Err(blocked_error(reason));
        }
        self.dirty = true;
        let mut channel = Some(self.open_channel(deadline).await?);
        let mut missing = Vec::new();
        for q in queues {
            let ch = match channel {
                Some(ch) => ch,
                None => self.open_channel(deadline).await?,
            };
            channel = Some(ch);
            let mut declare = Args::method(50, 10);
            // passive=1: only check existence, never create.
            declare.u16(0).short(q).u8(0b0000_0001).table(&[]);
            self.send_method(ch, &declare, deadline, "send queue.declare").await?;
            match self.recv_on(ch, deadline, "queue.declare-ok").await? {
                Ok(Method::DeclareOk { .. }) => {}
                Ok(m) => return Err(self.unexpected(&m, "queue.declare-ok")),
                Err((code, text)) => {
                    // The broker closed the channel (we answered close-ok).
                    channel = None;
                    if code != 404 {
                        self.dirty = false;
                        return Err(CheckError::new(
                            classify_close(code, false),
                            format!("queue.declare {q:?} refused: {code} {text}"),
                        ));
                    }
                    missing.push(q.as_str());
                }
            }
        }
        if !missing.is_empty() {
            if let Some(ch) = channel {
                self.close_channel(ch, deadline).await?;
            }
            self.dirty = false;
            let list = missing.iter().map(|q| format!("{q:?}")).collect::<Vec<_>>().join(", ");
            let noun = if missing.len() == 1 { "queue" } else { "queues" };
            return Err(CheckError::new(Cause::NotFound, format!("{noun} {list} not found")));
        }
        let ch = match channel {
            Some(ch) => ch,
            None => self.open_channel(deadline).await?,
        };
        // basic.publish to the default exchange with an empty routing key:
        // unroutable, so the broker drops it, but it makes this a publishing
        // connection, which is what gets `connection.blocked` during an alarm.
        let mut publish = Args::method(60, 40);
        publish.u16(0).short("").short("").u8(0);
        let mut header = Args::default();
        header.u16(60).u16(0).u64(0).u16(0);
        let mut close = Args::method(20, 40);
        close.u16(200).short("").u16(0).u16(0);
        let mut out = Vec::new();
        wire::frame(&mut out, wire::FRAME_METHOD, ch, &publish.0);
        wire::frame(&mut out, wire::FRAME_HEADER, ch, &header.0);
        wire::frame(&mut out, wire::FRAME_METHOD, ch, &close.0);
        self.write(&out, deadline, "send channel.close").await?;
        match self.recv_on(ch, deadline, "channel.close-ok").await {
            Ok(Ok(Method::ChannelCloseOk)) => {}
            Ok(Ok(m)) => return Err(self.unexpected(&m, "channel.close-ok")),
            Ok(Err((code, text))) => {
                self.dirty = false;
                return Err(CheckError::new(
                    classify_close(code, false),
                    format!("channel closed by the broker: {code} {text}"),
                ));
            }
            Err(e) if e.cause == Cause::Blocked => {
                // Blocked mid-exchange: the broker will read our channel.close
                // when the alarm clears; its close-ok is then a stale frame.
                self.dirty = false;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        self.dirty = false;
        Ok(())
    }

    /// Opens a new channel (ids rotate so stale replies of an earlier check never match).
    async fn open_channel(&mut self, deadline: Instant) -> Result<u16, CheckError> {
        let ch = self.next_channel;
        self.next_channel = if ch >= self.channel_max { 1 } else { ch + 1 };
        let mut open = Args::method(20, 10);
        open.short("");
        self.send_method(ch, &open, deadline, "send channel.open").await?;
        match self.recv_on(ch, deadline, "channel.open-ok").await? {
            Ok(Method::ChannelOpenOk) => Ok(ch),
            Ok(m) => Err(self.unexpected(&m, "channel.open-ok")),
            Err((code, text)) => {
                self.dirty = false;
                Err(CheckError::new(classify_close(code, false), format!("channel.open refused: {code} {text}")))
            }
        }
    }

    async fn close_channel(&mut self, ch: u16, deadline: Instant) -> Result<(), CheckError> {
        let mut close = Args::method(20, 40);
        close.u16(200).short("").u16(0).u16(0);
        self.send_method(ch, &close, deadline, "send channel.close").await?;
        match self.recv_on(ch, deadline, "channel.close-ok").await? {
            Ok(Method::ChannelCloseOk) | Err(_) => Ok(()),
            Ok(m) => Err(self.unexpected(&m, "channel.close-ok")),
        }
    }

    /// Waits for the next method on `ch`; `Err((code, text))` inside means the
    /// broker closed the channel (already acknowledged).
    async fn recv_on(
        &mut self,
        ch: u16,
        deadline: Instant,
        what: &str,
    ) -> Result<Result<Method, (u16, String)>, CheckError> {
        match self.recv_method(ch, deadline, what).await? {
            Method::ChannelClose { code, text } => {
                let ok = Args::method(20, 41);
                self.send_method(ch, &ok, deadline, "send channel.close-ok").await?;
                Ok(Err((code, text)))
            }
            m => Ok(Ok(m)),
        }
    }

    /// Reads until a method arrives on `ch`, handling connection-level traffic
    /// (heartbeats, blocked/unblocked, a close by the broker) and dropping
    /// stale frames of earlier channels.
    async fn recv_method(&mut self, ch: u16, deadline: Instant, what: &str) -> Result<Method, CheckError> {
        loop {
            let frame = match wire::parse_frame(&mut self.buf) {
                Err(e) => {
                    self.dead = true;
                    return Err(CheckError::new(Cause::Protocol, e));
                }
                Ok(Some(f)) => f,
                Ok(None) => {
                    self.fill(deadline, what).await?;
                    continue;
                }
            };
            if let Some(m) = self.handle_frame(frame, ch, deadline).await? {
                return Ok(m);
            }
        }
    }

    /// Handles one frame; returns the method if it is for `ch` and not connection-level.
    async fn handle_frame(&mut self, frame: Frame, ch: u16, deadline: Instant) -> Result<Option<Method>, CheckError> {
        if frame.kind != wire::FRAME_METHOD {
            // Heartbeats, and content of nothing we asked for.
            return Ok(None);
        }
        let method = Method::parse(&frame.payload).map_err(|e| {
            self.dead = true;
            CheckError::new(Cause::Protocol, e)
        })?;
        if frame.channel == 0 {
            match method {
                Method::Blocked(reason) => {
                    debug!(%reason, "amqp connection blocked");
                    self.blocked = Some(reason.clone());
                    if ch != 0 {
                        // Whatever we sent waits in the broker until the alarm clears; its
                        // replies then arrive on a channel the next check no longer uses.
                        self.dirty = false;
                        // The broker has stopped reading this connection: no reply will come.
                        return Err(blocked_error(&reason));
                    }
                    return Ok(None);
                }
                Method::Unblocked => {
                    self.blocked = None;
                    return Ok(None);
                }
                Method::Close { code, text, class, method } => {
                    let ok = Args::method(10, 51);
                    let _ = self.send_method(0, &ok, deadline, "send connection.close-ok").await;
                    self.dead = true;
                    self.closed = true;
                    let cause = classify_close(code, !self.opened);
                    let during =
                        if class != 0 { format!(" (in reply to method {class}.{method})") } else { String::new() };
                    return Err(CheckError::new(
                        cause,
                        format!("the broker closed the connection: {code} {text}{during}"),
                    ));
                }
                m if ch == 0 => return Ok(Some(m)),
                m => {
                    self.dead = true;
                    return Err(CheckError::new(Cause::Protocol, format!("unexpected {} on channel 0", m.name())));
                }
            }
        }
        if frame.channel != ch {
            // A stale channel of an earlier check: acknowledge a close, drop the rest.
            if let Method::ChannelClose { .. } = method {
                let ok = Args::method(20, 41);
                self.send_method(frame.channel, &ok, deadline, "send channel.close-ok").await?;
            }
            return Ok(None);
        }
        Ok(Some(method))
    }

    /// Reads more bytes by `deadline`.
    async fn fill(&mut self, deadline: Instant, what: &str) -> Result<(), CheckError> {
        let mut chunk = [0u8; 4096];
        match timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => Err(CheckError::new(Cause::ReadTimeout, format!("no {what} in time"))),
            Ok(Err(e)) => {
                self.dead = true;
                Err(io_error(&e, Phase::Exchange, &format!("waiting for {what}")))
            }
            Ok(Ok(0)) => {
                self.dead = true;
                Err(CheckError::new(
                    Cause::Reset,
                    format!("the broker closed the connection while we waited for {what}"),
                ))
            }
            Ok(Ok(n)) => {
                self.last_rx = Instant::now();
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// Processes whatever the broker sent since the last check (heartbeats,
    /// blocked/unblocked, a close), without waiting.
    async fn drain(&mut self, deadline: Instant) {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.try_read(&mut chunk) {
                Ok(0) => {
                    self.dead = true;
                    break;
                }
                Ok(n) => {
                    self.last_rx = Instant::now();
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
        }
        loop {
            match wire::parse_frame(&mut self.buf) {
                Ok(Some(f)) => {
                    // Channel 0 is "the check's channel" here so methods come back to us.
                    match self.handle_frame(f, 0, deadline).await {
                        Ok(Some(_)) | Ok(None) => {}
                        Err(_) => {
                            self.dead = true;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
        }
    }

    async fn send_method(&mut self, ch: u16, args: &Args, deadline: Instant, what: &str) -> Result<(), CheckError> {
        let mut out = Vec::with_capacity(args.0.len() + 8);
        wire::frame(&mut out, wire::FRAME_METHOD, ch, &args.0);
        self.write(&out, deadline, what).await
    }

    async fn write(&mut self, bytes: &[u8], deadline: Instant, what: &str) -> Result<(), CheckError> {
        match timeout_at(deadline, self.stream.write_all(bytes)).await {
            Err(_) => {
                // A partial frame may be on the wire: this connection is unusable.
                self.dead = true;
                Err(CheckError::new(Cause::ReadTimeout, format!("{what}: the broker does not read (send buffer full)")))
            }
            Ok(Err(e)) => {
                self.dead = true;
                Err(io_error(&e, Phase::Exchange, what))
            }
            Ok(Ok(())) => Ok(()),
        }
    }

    fn unexpected(&mut self, m: &Method, wanted: &str) -> CheckError {
        self.dead = true;
        CheckError::new(Cause::Protocol, format!("expected {wanted}, got {}", m.name()))
    }

    /// Ends the connection with connection.close / close-ok by `deadline`
    /// (then just drops it), leaving no "unexpectedly closed" in the broker log.
    async fn close(mut self, deadline: Instant) {
        if self.dead {
            self.closed = true;
            return;
        }
        let mut close = Args::method(10, 50);
        close.u16(200).short("healthgate closing").u16(0).u16(0);
        let sent = self.send_method(0, &close, deadline, "send connection.close").await.is_ok();
        // A blocked connection is not read by the broker: no close-ok will come.
        if sent && self.blocked.is_none() {
            loop {
                let frame = match wire::parse_frame(&mut self.buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => match self.fill(deadline, "connection.close-ok").await {
                        Ok(()) => continue,
                        Err(_) => break,
                    },
                    Err(_) => break,
                };
                if frame.kind != wire::FRAME_METHOD || frame.channel != 0 {
                    continue;
                }
                match Method::parse(&frame.payload) {
                    Ok(Method::CloseOk) => break,
                    Ok(Method::Close { .. }) => {
                        // Both sides closed at once: acknowledge theirs.
                        let ok = Args::method(10, 51);
                        let _ = self.send_method(0, &ok, deadline, "send connection.close-ok").await;
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
        self.closed = true;
        // FIN, then wait briefly for the broker's FIN so no unread byte turns our close into a RST.
        let _ = timeout_at(deadline, self.stream.shutdown()).await;
        if self.blocked.is_some() {
            return;
        }
        let mut chunk = [0u8; 1024];
        while let Ok(Ok(n)) = timeout_at(deadline, self.stream.read(&mut chunk)).await {
            if n == 0 {
                break;
            }
        }
    }
}

impl Drop for Conn {
    /// Best effort when a connection is dropped without `close` (runtime
    /// shutting down): queue connection.close without blocking.
    fn drop(&mut self) {
        if self.closed || self.dead || self.dirty {
            return;
        }
        let mut chunk = [0u8; 4096];
        while let Ok(n) = self.stream.try_read(&mut chunk) {
            if n == 0 {
                break;
            }
        }
        let mut close = Args::method(10, 50);
        close.u16(200).short("healthgate closing").u16(0).u16(0);
        let mut out = Vec::new();
        wire::frame(&mut out, wire::FRAME_METHOD, 0, &close.0);
        let _ = self.stream.try_write(&out);
    }
}

fn blocked_error(reason: &str) -> CheckError {
    CheckError::new(Cause::Blocked, format!("the broker blocked the connection (resource alarm: {reason})"))
}

/// Closes a connection in the background, bounded, so the check that gave
/// up on it does not wait.
fn abandon(conn: Conn) {
    if conn.dead {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn(conn.close(Instant::now() + ABANDON_BOUND));
        }
        Err(_) => drop(conn),
    }
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
            abandon(existing.take().expect("checked above"));
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
                // Seed 001: an idle connection the broker dropped (EOF, reset,
                // CONNECTION_FORCED) is not an outage; judge a fresh one. A
                // timeout is not retried: the broker is there but silent.
                debug!(node = %node.address, error = %e, "amqp connection went stale; reconnecting once");
                retried = true;
            }
            Err(e) => {
                if conn.dead {
                    drop(conn);
                } else if conn.dirty {
                    abandon(conn);
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

/// Polls every future to completion concurrently (a tiny `join_all`).
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future completed")).collect()
}

/// How informative a failure cause is: a misconfiguration or a broker-side
/// condition says more than a transport failure.
fn cause_rank(c: Cause) -> u8 {
    match c {
        Cause::Config | Cause::Auth | Cause::Vhost | Cause::NotFound | Cause::Blocked => 0,
        Cause::Protocol | Cause::ServerError | Cause::Tls => 1,
        Cause::ReadTimeout | Cause::ConnectTimeout => 2,
        Cause::Refused | Cause::Reset => 3,
        _ => 4,
    }
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
    let worst = failed.iter().min_by_key(|(_, e)| cause_rank(e.cause)).expect("a failing verdict has a failed node");
    if total == 1 {
        return Err(worst.1.clone());
    }
    let detail = failed.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; ");
    Err(CheckError::new(
        worst.1.cause,
        format!(
            "{up} of {total} nodes up, {} required (require: {}); {detail}",
            require.needed(total),
            require.as_str()
        ),
    ))
}

impl Check for AmqpCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        let handles: Vec<_> = self
            .nodes
            .iter()
            .map(|n| tokio::spawn(probe(n.slot.clone(), n.target.clone(), self.shared.clone(), deadline)))
            .collect();
        // The tasks bound themselves by `deadline`; the margin only covers scheduling.
        let waits = handles.into_iter().map(|h| timeout_at(deadline + Duration::from_millis(100), h)).collect();
        let results: Vec<Result<(), CheckError>> = join_all(waits)
            .await
            .into_iter()
            .zip(self.nodes.iter_mut())
            .map(|(r, node)| {
                let r = match r {
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
                r
            })
            .collect();
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
        let closes = self
            .nodes
            .iter()
            .map(|n| {
                let slot = n.slot.clone();
                async move {
                    if let Ok(mut slot) = timeout_at(deadline, slot.lock_owned()).await {
                        slot.pending = None;
                        if let Some(conn) = slot.conn.take() {
                            conn.close(deadline).await;
                        }
                    }
                }
            })
            .collect();
        join_all(closes).await;
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

    #[test]
    fn close_codes_map_to_causes() {
        assert_eq!(classify_close(403, true), Cause::Auth);
        assert_eq!(classify_close(530, true), Cause::Vhost);
        assert_eq!(classify_close(530, false), Cause::ServerError);
        assert_eq!(classify_close(404, false), Cause::NotFound);
        assert_eq!(classify_close(505, false), Cause::Protocol);
        assert_eq!(classify_close(320, false), Cause::ServerError);
    }

    #[test]
    fn frames_round_trip_and_garbage_is_a_protocol_error() {
        let mut a = Args::method(10, 30);
        a.u16(2047).u32(131072).u16(60);
        let mut buf = Vec::new();
        wire::frame(&mut buf, wire::FRAME_METHOD, 0, &a.0);
        let mut partial = buf[..5].to_vec();
        assert_eq!(wire::parse_frame(&mut partial).unwrap(), None);
        let f = wire::parse_frame(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(
            Method::parse(&f.payload).unwrap(),
            Method::Tune { channel_max: 2047, frame_max: 131072, heartbeat: 60 }
        );
        assert!(
            wire::parse_frame(&mut b"HTTP/1.1 400 Bad Request\r\n".to_vec())
                .unwrap_err()
                .contains("not an AMQP server")
        );
        assert!(wire::parse_frame(&mut b"AMQP\x00\x00\x09\x00".to_vec()).unwrap_err().contains("0-9-1"));
    }

    #[test]
    fn start_reads_version_through_every_field_type() {
        let mut props = Args::default();
        // A table with types a broker may send, then the strings we want.
        let mut t = Args::default();
        t.short("n").u8(b'I').u32(7);
        t.short("arr").u8(b'A').u32(5).u8(b's').u16(1).u8(b'V').u8(b'V');
        t.short("x").u8(b'l').u64(1);
        t.short("capabilities").u8(b'F').table(&[("publisher_confirms", Value::Bool(true))]);
        t.short("product").u8(b'S').long(b"RabbitMQ");
        t.short("version").u8(b'S').long(b"3.10.8");
        props.long(&t.0);
        let mut start = Args::method(10, 10);
        start.u8(0).u8(9);
        start.0.extend_from_slice(&props.0);
        start.long(b"AMQPLAIN PLAIN").long(b"en_US");
        match Method::parse(&start.0).unwrap() {
            Method::Start { version, product, mechanisms } => {
                assert_eq!(version.as_deref(), Some("3.10.8"));
                assert_eq!(product.as_deref(), Some("RabbitMQ"));
                assert_eq!(mechanisms, "AMQPLAIN PLAIN");
            }
            m => panic!("{m:?}"),
        }
    }

    async fn check_against(port: u16) -> CheckError {
        let (s, dep) = settings(&format!("    url: amqp://127.0.0.1:{port}/\n")).unwrap();
        let mut c = AmqpCheck::new(s, &dep);
        let err = c.check(Instant::now() + Duration::from_millis(300)).await.unwrap_err();
        assert_eq!(c.details().nodes.len(), 1);
        assert_eq!(c.details().nodes[0].cause, Some(err.cause));
        err
    }

    #[tokio::test]
    async fn silent_server_is_a_read_timeout_within_the_deadline() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let started = std::time::Instant::now();
        assert_eq!(check_against(port).await.cause, Cause::ReadTimeout);
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn http_server_is_a_protocol_error() {
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
