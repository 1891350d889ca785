//! One AMQP connection to one broker node: the handshake, the liveness round
//! trip (channel open, passive `queue.declare`, an unroutable publish,
//! channel close) and the clean close, every step bounded by the check's
//! deadline and every failure classified.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::AmqpNode;
use super::wire::{self, Body, Frame, Incoming, Method, Value, WireError};
use crate::check::io::{Phase, io_error};
use crate::check::text::{self, KnownSecrets, clip};
use crate::check::tls::{self, Stream, TlsSettings};
use crate::check::{ABANDON_AFTER, Cause, CheckError};
use crate::config::SecretSource;

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

/// Whether the text of a 404 reply to a passive `queue.declare` says that
/// the queue exists but cannot be used now, rather than that it does not
/// exist: RabbitMQ answers 404 NOT_FOUND both for a missing queue ("no queue
/// 'q' in vhost '/'") and for a durable queue whose home node is down ("home
/// node 'rabbit@b' of durable queue 'q' in vhost '/' is down or
/// inaccessible"), a queue process that crashed or was stopped, or an
/// operation on the queue that timed out.
fn queue_unavailable(text: &str) -> bool {
    const PHRASES: [&str; 5] = [
        "is down or inaccessible",
        "has crashed and failed to restart",
        "is stopped by supervisor",
        "due to timeout",
        "may be stopping or being demoted",
    ];
    PHRASES.iter().any(|p| text.contains(p))
}

/// The longest broker reply text kept in a message, in bytes (an AMQP short
/// string is at most 255 bytes; the cap holds whatever the decoder accepts).
const MAX_REPLY_TEXT: usize = 255;

/// Most bytes the broker may send during one check (handshake or round
/// trip): a few frames of the largest size, far more than a healthy broker
/// sends, so a flood ends the check instead of occupying it until its deadline.
const CHECK_RX_MAX: usize = 4 * wire::FRAME_MAX as usize;
/// Most bytes read from an idle connection before a check (heartbeats, a
/// blocked notice) or while closing it; more is a flood.
pub(super) const IDLE_RX_MAX: usize = 64 * 1024;
/// Connections given up mid-exchange that may still close in the background,
/// per node; further ones are dropped at once, so a broker that stalls every
/// check cannot pile up connections (and their buffers) for [`ABANDON_AFTER`].
const ABANDONED_MAX: usize = 2;

/// The error of a protocol violation by the broker.
fn protocol(e: WireError) -> CheckError {
    CheckError::new(Cause::Protocol, e.to_string())
}

/// Static facts every node's probe needs.
pub(super) struct Shared {
    /// Where the password comes from (`None`: `guest`).
    pub(super) password: Option<SecretSource>,
    /// Queues that must exist.
    pub(super) queues: Vec<String>,
    /// Heartbeat to negotiate, seconds.
    pub(super) heartbeat: u16,
    /// The name the broker shows for our connections.
    pub(super) connection_name: String,
    /// TLS for every node.
    pub(super) tls: Option<TlsSettings>,
    /// The passwords sent so far, kept out of published messages.
    pub(super) secrets: KnownSecrets,
}

/// A connection to one node, after `connection.open-ok`.
pub(super) struct Conn {
    stream: Stream,
    inbox: wire::Inbox,
    channel_max: u16,
    next_channel: u16,
    /// `Some(reason)` between `connection.blocked` and `connection.unblocked`.
    blocked: Option<String>,
    /// The connection can no longer be used (EOF, reset, closed by the broker).
    pub(super) dead: bool,
    /// An exchange is half done (a timeout): the connection must be abandoned.
    pub(super) dirty: bool,
    /// Ended cleanly; nothing left to do on drop.
    closed: bool,
    /// `connection.open-ok` received (a close before it is about login or vhost).
    opened: bool,
    /// When the broker last sent anything (heartbeats included).
    last_rx: Instant,
    /// The negotiated heartbeat in seconds (0: none).
    heartbeat: u16,
    /// The broker's version (and product, when not RabbitMQ).
    pub(super) version: Option<String>,
    /// Bytes the broker may still send in the current exchange.
    rx_left: usize,
}

impl Conn {
    /// Connects (every resolved address) and sends the protocol header, by `deadline`.
    pub(super) async fn connect(node: &AmqpNode, shared: &Shared, deadline: Instant) -> Result<Conn, CheckError> {
        let (stream, _) = tls::connect(&node.address, shared.tls.as_ref(), deadline).await?;
        let mut c = Conn {
            stream,
            inbox: wire::Inbox::default(),
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
            rx_left: CHECK_RX_MAX,
        };
        c.write(wire::PROTOCOL_HEADER, deadline, "send protocol header").await?;
        Ok(c)
    }

    /// Waits for `connection.start`, logs in and opens the vhost, by
    /// `deadline`. When the broker has not said a word yet, the connection
    /// is handed back so the next check can keep waiting on it.
    pub(super) async fn handshake(
        mut self,
        node: &AmqpNode,
        shared: &Shared,
        deadline: Instant,
    ) -> Result<Conn, (CheckError, Option<Conn>)> {
        let start = match self.recv_method(0, deadline, "connection.start").await {
            Ok(m) => m,
            Err(e) if e.cause == Cause::ReadTimeout && self.inbox.is_empty() && !self.dead => {
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
        start: Incoming,
        node: &AmqpNode,
        shared: &Shared,
        deadline: Instant,
    ) -> Result<(), CheckError> {
        let c = self;
        let (version, product, mechanisms) = match start {
            Incoming::Start { version, product, mechanisms } => (version, product, mechanisms),
            m => return Err(c.unexpected(&m, "connection.start")),
        };
        c.version = version.map(|v| match product {
            Some(p) if p != "RabbitMQ" => text::clip(&format!("{p} {v}"), text::MAX_DETAIL),
            _ => text::clip(&v, text::MAX_DETAIL),
        });
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            return Err(CheckError::new(
                Cause::Protocol,
                format!("the broker offers no PLAIN login (it offers {:?})", text::clip(&mechanisms, text::MAX_QUOTE)),
            ));
        }
        let password = match &shared.password {
            Some(src) => src.read().map_err(|e| CheckError::new(Cause::Config, e.to_string()))?.expose().to_string(),
            None => "guest".to_string(),
        };
        shared.secrets.remember(&password);
        let mut response = Vec::with_capacity(2 + node.user.len() + password.len());
        response.push(0);
        response.extend_from_slice(node.user.as_bytes());
        response.push(0);
        response.extend_from_slice(password.as_bytes());
        let capabilities = vec![
            ("authentication_failure_close".to_string(), Value::Bool(true)),
            ("connection.blocked".to_string(), Value::Bool(true)),
        ];
        let properties = [
            ("product".to_string(), Value::Str("healthgate".into())),
            ("version".to_string(), Value::Str(env!("CARGO_PKG_VERSION").into())),
            ("connection_name".to_string(), Value::Str(shared.connection_name.clone())),
            ("capabilities".to_string(), Value::Table(capabilities)),
        ];
        let start_ok = Method::ConnectionStartOk {
            properties: &properties,
            mechanism: "PLAIN",
            response: &response,
            locale: "en_US",
        };
        c.send_method(0, &start_ok, deadline, "send connection.start-ok").await?;
        let (channel_max, frame_max) = match c.recv_method(0, deadline, "connection.tune").await? {
            Incoming::Tune { channel_max, frame_max, .. } => (channel_max, frame_max),
            Incoming::Secure => {
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
        c.inbox.set_max_frame(frame_max);
        let mut out = Vec::new();
        Method::ConnectionTuneOk { channel_max: c.channel_max, frame_max, heartbeat: shared.heartbeat }
            .encode(0, &mut out);
        Method::ConnectionOpen { vhost: &node.vhost }.encode(0, &mut out);
        c.write(&out, deadline, "send connection.open").await?;
        match c.recv_method(0, deadline, "connection.open-ok").await? {
            Incoming::OpenOk => {}
            m => return Err(c.unexpected(&m, "connection.open-ok")),
        }
        c.opened = true;
        c.dirty = false;
        Ok(())
    }

    /// One liveness round trip: channel.open, passive declares, an empty
    /// unroutable publish (alarm detection), channel.close.
    pub(super) async fn round_trip(&mut self, queues: &[String], deadline: Instant) -> Result<(), CheckError> {
        if let Some(reason) = &self.blocked {
            // A blocked connection is not read by the broker, so no round trip
            // is possible; its heartbeats still arrive, and their absence means
            // the broker died or froze while blocked.
            let silent = self.last_rx.elapsed();
            if heartbeats_missed(silent, self.heartbeat) {
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
        // Queues that exist but cannot be used now, with the broker's reply text.
        let mut unavailable: Vec<(&str, String)> = Vec::new();
        for q in queues {
            let ch = match channel {
                Some(ch) => ch,
                None => self.open_channel(deadline).await?,
            };
            channel = Some(ch);
            // Passive: only check existence, never create.
            let declare = Method::QueueDeclare { queue: q, passive: true };
            self.send_method(ch, &declare, deadline, "send queue.declare").await?;
            match self.recv_on(ch, deadline, "queue.declare-ok").await? {
                Ok(Incoming::DeclareOk { .. }) => {}
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
                    if queue_unavailable(&text) {
                        unavailable.push((q.as_str(), clip(&text, MAX_REPLY_TEXT)));
                    } else {
                        missing.push(q.as_str());
                    }
                }
            }
        }
        if !missing.is_empty() || !unavailable.is_empty() {
            if let Some(ch) = channel {
                self.close_channel(ch, deadline).await?;
            }
            self.dirty = false;
            let mut parts = Vec::new();
            if !missing.is_empty() {
                let list = missing.iter().map(|q| format!("{q:?}")).collect::<Vec<_>>().join(", ");
                let noun = if missing.len() == 1 { "queue" } else { "queues" };
                parts.push(format!("{noun} {list} not found"));
            }
            for (q, text) in &unavailable {
                parts.push(format!("queue {q:?} unavailable: 404 {text}"));
            }
            // A missing queue is a lasting fact; an unavailable one a passing state.
            let cause = if missing.is_empty() { Cause::NotReady } else { Cause::NotFound };
            return Err(CheckError::new(cause, parts.join("; ")));
        }
        let ch = match channel {
            Some(ch) => ch,
            None => self.open_channel(deadline).await?,
        };
        // basic.publish to the default exchange with an empty routing key:
        // unroutable, so the broker drops it, but it makes this a publishing
        // connection, which is what gets `connection.blocked` during an alarm.
        let mut out = Vec::new();
        Method::BasicPublish { exchange: "", routing_key: "" }.encode(ch, &mut out);
        wire::encode_empty_message_header(ch, &mut out);
        Method::ChannelClose { code: 200, text: "" }.encode(ch, &mut out);
        self.write(&out, deadline, "send channel.close").await?;
        match self.recv_on(ch, deadline, "channel.close-ok").await {
            Ok(Ok(Incoming::ChannelCloseOk)) => {}
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
        self.send_method(ch, &Method::ChannelOpen, deadline, "send channel.open").await?;
        match self.recv_on(ch, deadline, "channel.open-ok").await? {
            Ok(Incoming::ChannelOpenOk) => Ok(ch),
            Ok(m) => Err(self.unexpected(&m, "channel.open-ok")),
            Err((code, text)) => {
                self.dirty = false;
                Err(CheckError::new(classify_close(code, false), format!("channel.open refused: {code} {text}")))
            }
        }
    }

    async fn close_channel(&mut self, ch: u16, deadline: Instant) -> Result<(), CheckError> {
        let close = Method::ChannelClose { code: 200, text: "" };
        self.send_method(ch, &close, deadline, "send channel.close").await?;
        match self.recv_on(ch, deadline, "channel.close-ok").await? {
            Ok(Incoming::ChannelCloseOk) | Err(_) => Ok(()),
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
    ) -> Result<Result<Incoming, (u16, String)>, CheckError> {
        match self.recv_method(ch, deadline, what).await? {
            Incoming::ChannelClose { code, text } => {
                self.send_method(ch, &Method::ChannelCloseOk, deadline, "send channel.close-ok").await?;
                Ok(Err((code, text)))
            }
            m => Ok(Ok(m)),
        }
    }

    /// Reads until a method arrives on `ch`, handling connection-level traffic
    /// (heartbeats, blocked/unblocked, a close by the broker) and dropping
    /// stale frames of earlier channels.
    async fn recv_method(&mut self, ch: u16, deadline: Instant, what: &str) -> Result<Incoming, CheckError> {
        loop {
            let frame = match self.inbox.next_frame() {
                Ok(f) => f,
                Err(WireError::Incomplete) => {
                    self.fill(deadline, what).await?;
                    continue;
                }
                Err(e) => {
                    self.dead = true;
                    return Err(protocol(e));
                }
            };
            if let Some(m) = self.handle_frame(frame, ch, deadline).await? {
                return Ok(m);
            }
        }
    }

    /// Handles one frame; returns the method if it is for `ch` and not connection-level.
    async fn handle_frame(&mut self, frame: Frame, ch: u16, deadline: Instant) -> Result<Option<Incoming>, CheckError> {
        let Body::Method(payload) = frame.body else {
            // Heartbeats, and content of nothing we asked for.
            return Ok(None);
        };
        let method = Incoming::decode(&payload).map_err(|e| {
            self.dead = true;
            protocol(e)
        })?;
        if frame.channel == 0 {
            match method {
                Incoming::Blocked(reason) => {
                    debug!(reason = %text::clip(&reason, text::MAX_QUOTE), "amqp connection blocked");
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
                Incoming::Unblocked => {
                    self.blocked = None;
                    return Ok(None);
                }
                Incoming::Close { code, text, class, method } => {
                    let _ = self.send_method(0, &Method::ConnectionCloseOk, deadline, "send connection.close-ok").await;
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
            if let Incoming::ChannelClose { .. } = method {
                self.send_method(frame.channel, &Method::ChannelCloseOk, deadline, "send channel.close-ok").await?;
            }
            return Ok(None);
        }
        Ok(Some(method))
    }

    /// Lets the broker send up to [`CHECK_RX_MAX`] bytes in the exchange that starts.
    pub(super) fn new_exchange(&mut self) {
        self.rx_left = CHECK_RX_MAX;
    }

    /// Reads more bytes by `deadline`, within the exchange's byte budget.
    async fn fill(&mut self, deadline: Instant, what: &str) -> Result<(), CheckError> {
        if self.rx_left == 0 {
            self.dead = true;
            return Err(CheckError::new(
                Cause::Protocol,
                format!("the broker sent more than {} KiB while we waited for {what}", CHECK_RX_MAX / 1024),
            ));
        }
        let mut chunk = [0u8; 4096];
        let want = chunk.len().min(self.rx_left);
        match timeout_at(deadline, self.stream.read(&mut chunk[..want])).await {
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
                self.rx_left -= n;
                self.last_rx = Instant::now();
                self.inbox.extend(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// Processes whatever the broker sent since the last check (heartbeats,
    /// blocked/unblocked, a close), without waiting and at most
    /// [`IDLE_RX_MAX`] bytes: a broker that sends more while nobody asked is
    /// flooding, and the connection is given up (an error, `dead` set).
    /// Frames are decoded as each chunk arrives, so the inbox never holds
    /// more than one partial frame.
    pub(super) async fn drain(&mut self, deadline: Instant) -> Result<(), CheckError> {
        let mut taken = 0;
        let mut chunk = [0u8; 4096];
        loop {
            loop {
                match self.inbox.next_frame() {
                    Ok(f) => {
                        // Channel 0 is "the check's channel" here so methods come back to us.
                        if self.handle_frame(f, 0, deadline).await.is_err() {
                            self.dead = true;
                            return Ok(());
                        }
                    }
                    Err(WireError::Incomplete) => break,
                    Err(_) => {
                        self.dead = true;
                        return Ok(());
                    }
                }
            }
            if taken >= IDLE_RX_MAX {
                self.dead = true;
                return Err(CheckError::new(
                    Cause::Protocol,
                    format!("the broker sent more than {} KiB between two checks, unasked", IDLE_RX_MAX / 1024),
                ));
            }
            match self.stream.try_read(&mut chunk) {
                Ok(0) => {
                    self.dead = true;
                    return Ok(());
                }
                Ok(n) => {
                    taken += n;
                    self.last_rx = Instant::now();
                    self.inbox.extend(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => {
                    self.dead = true;
                    return Ok(());
                }
            }
        }
    }

    async fn send_method(&mut self, ch: u16, m: &Method<'_>, deadline: Instant, what: &str) -> Result<(), CheckError> {
        let mut out = Vec::with_capacity(64);
        m.encode(ch, &mut out);
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

    fn unexpected(&mut self, m: &Incoming, wanted: &str) -> CheckError {
        self.dead = true;
        CheckError::new(Cause::Protocol, format!("expected {wanted}, got {}", m.name()))
    }

    /// Ends the connection with connection.close / close-ok by `deadline`
    /// (then just drops it), leaving no "unexpectedly closed" in the broker log.
    pub(super) async fn close(mut self, deadline: Instant) {
        if self.dead {
            self.closed = true;
            return;
        }
        let close = Method::ConnectionClose { code: 200, text: "healthgate closing" };
        let sent = self.send_method(0, &close, deadline, "send connection.close").await.is_ok();
        self.rx_left = IDLE_RX_MAX;
        // A blocked connection is not read by the broker: no close-ok will come.
        if sent && self.blocked.is_none() {
            loop {
                let frame = match self.inbox.next_frame() {
                    Ok(f) => f,
                    Err(WireError::Incomplete) => match self.fill(deadline, "connection.close-ok").await {
                        Ok(()) => continue,
                        Err(_) => break,
                    },
                    Err(_) => break,
                };
                let Body::Method(payload) = frame.body else { continue };
                if frame.channel != 0 {
                    continue;
                }
                match Incoming::decode(&payload) {
                    Ok(Incoming::CloseOk) => break,
                    Ok(Incoming::Close { .. }) => {
                        // Both sides closed at once: acknowledge theirs.
                        let _ =
                            self.send_method(0, &Method::ConnectionCloseOk, deadline, "send connection.close-ok").await;
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
        let mut left = IDLE_RX_MAX;
        while let Ok(Ok(n)) = timeout_at(deadline, self.stream.read(&mut chunk)).await {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
    }

    /// Closes the connection in the background, bounded by [`ABANDON_AFTER`]
    /// and [`IDLE_RX_MAX`], so the check that gave up on it does not wait.
    /// `in_flight` counts the node's connections closing so; beyond
    /// [`ABANDONED_MAX`] the connection is dropped at once instead.
    pub(super) fn abandon(self, in_flight: &Arc<AtomicUsize>) {
        if self.dead {
            return;
        }
        let Ok(h) = tokio::runtime::Handle::try_current() else { return };
        if in_flight.fetch_add(1, Ordering::AcqRel) >= ABANDONED_MAX {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            debug!("too many abandoned amqp connections closing; dropping this one");
            return;
        }
        let in_flight = in_flight.clone();
        h.spawn(async move {
            self.close(Instant::now() + ABANDON_AFTER).await;
            in_flight.fetch_sub(1, Ordering::AcqRel);
        });
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
        let mut left = IDLE_RX_MAX;
        while let Ok(n) = self.stream.try_read(&mut chunk) {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
        }
        let mut out = Vec::new();
        Method::ConnectionClose { code: 200, text: "healthgate closing" }.encode(0, &mut out);
        let _ = self.stream.try_write(&out);
    }
}

/// Whether a blocked connection has been silent for longer than two
/// heartbeats (never, with heartbeats off): a live broker keeps sending
/// heartbeats to a connection it blocks, so this silence means it died or froze.
fn heartbeats_missed(silent: Duration, heartbeat: u16) -> bool {
    heartbeat > 0 && silent > Duration::from_secs(2 * u64::from(heartbeat))
}

fn blocked_error(reason: &str) -> CheckError {
    CheckError::new(Cause::Blocked, format!("the broker blocked the connection (resource alarm: {reason})"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_404_naming_a_down_home_node_is_unavailable_not_missing() {
        assert!(queue_unavailable(
            "NOT_FOUND - home node 'rabbit@b' of durable queue 'q' in vhost '/' is down or inaccessible"
        ));
        assert!(queue_unavailable("NOT_FOUND - queue 'q' in vhost '/' process is stopped by supervisor"));
        assert!(!queue_unavailable("NOT_FOUND - no queue 'q' in vhost '/'"));
    }

    #[test]
    fn a_blocked_connection_is_silent_only_after_two_heartbeats() {
        assert!(!heartbeats_missed(Duration::from_secs(2), 1));
        assert!(heartbeats_missed(Duration::from_millis(2001), 1));
        assert!(!heartbeats_missed(Duration::from_secs(59), 30));
        assert!(!heartbeats_missed(Duration::from_secs(3600), 0), "heartbeats off: never silent");
    }

    fn node(port: u16) -> (AmqpNode, Shared) {
        let node = AmqpNode {
            address: crate::config::HostPort { host: "127.0.0.1".into(), port },
            user: "guest".into(),
            vhost: "/".into(),
        };
        let shared = Shared {
            password: None,
            queues: vec![],
            heartbeat: 0,
            connection_name: "t".into(),
            tls: None,
            secrets: KnownSecrets::default(),
        };
        (node, shared)
    }

    /// A broker that completes the TCP handshake but never says a word (a
    /// frozen one does exactly that): once the deadline has passed, the
    /// handshake is a read timeout at once, and the connection is handed back
    /// for the next check to keep waiting on.
    #[tokio::test]
    async fn a_silent_broker_is_a_read_timeout_at_the_deadline_and_the_connection_is_kept() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (node, shared) = node(l.local_addr().unwrap().port());
        let bound = Instant::now() + Duration::from_secs(10);
        let conn = Conn::connect(&node, &shared, bound).await.unwrap();
        let (_server, _) = timeout_at(bound, l.accept()).await.unwrap().unwrap();
        // A deadline already passed: the read is tried once, then times out
        // without waiting, whatever the machine's load.
        let handshake = conn.handshake(&node, &shared, Instant::now());
        let result = tokio::time::timeout(Duration::ZERO, handshake).await.expect("no wait past the deadline");
        match result {
            Err((e, Some(kept))) => {
                assert_eq!(e.cause, Cause::ReadTimeout, "{e}");
                assert!(!kept.dead && kept.inbox.is_empty());
            }
            Err((e, None)) => panic!("the waiting connection was not kept: {e}"),
            Ok(_) => panic!("a silent broker completed the handshake"),
        }
    }
}
