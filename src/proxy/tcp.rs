//! The tcp (L4) listener: admits connections by dependency state and relays
//! bytes between the client and the app.
//!
//! One [`serve`] runs per worker and listener, on the worker's current-thread
//! runtime, around the shared accept loop ([`super::accept`]). Its
//! connections are local tasks; the drain waits for their permits to come
//! back and cuts the stragglers at its deadline. Per connection:
//!
//! 1. **Admission** at accept: one atomic load ([`Health::admission`](crate::state::Health::admission)). Out
//!    of service (or degraded with `admit_degraded: false`) → the connection
//!    is ended per `reject` (`close`: FIN, `reset`: RST): at once, or, with
//!    `reject_delay`, after holding it unread for a jittered time (up to
//!    `reject_hold_max` at once), so a client that reconnects at once (a
//!    job consumer in front of its broker) makes one attempt per hold, not
//!    hundreds a second. A held connection whose dependencies recover is
//!    served after all.
//! 2. **Limit**: at `max_connections` (per listener, across workers) the
//!    connection waits unread, and the worker stops accepting, until a
//!    permit frees up; admission is then decided again.
//! 3. **Connect** to the upstream, resolved at every connect, every address
//!    tried, bounded by `connect_timeout`; on failure the client is ended the
//!    same way as a rejected one and the outcome is `upstream_error`.
//! 4. **Relay** both directions concurrently in one task with two reusable
//!    buffers (pooled per worker): a FIN from one side becomes a write
//!    shutdown towards the other while the other direction keeps flowing; a
//!    reset on one side is passed on as a reset to the other; no traffic
//!    either way for `idle_timeout` closes both.
//! 5. **Cut**: a session healthgate ends itself (`on_outage: close_existing`,
//!    the drain deadline) is reset towards the app, and ended per `reject`
//!    towards the client: neither may take a cut-off stream for a complete one
//!    unless the operator chose a FIN for clients.
//!
//! Byte counters are accumulated per connection and added to the shared
//! Prometheus counters every [`FLUSH_EVERY`] and at close, so the hot loop
//! touches no shared cache line.

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, sleep, timeout_at};
use tracing::{debug, info};

use super::accept::{self, Permit, Permits, Serve};
use super::{DrainSignal, ListenerCtx, LiveCtx};
use crate::config::{TcpOnOutage, TcpReject};
use crate::metrics::{AtomicHistogram, ListenerLabels, TcpBytesLabels, TcpOutcomeLabels};
use crate::net;
use crate::state::{Admission, Reject};

/// Size of each relay buffer (two per connection). 16 KiB, like HAProxy's
/// default `bufsize`: large enough for bulk throughput, small enough for
/// many idle connections.
const BUFFER_SIZE: usize = 16 * 1024;
/// Most idle buffers a worker keeps for reuse (4 MiB); beyond that they are freed.
const POOL_MAX: usize = 256;
/// How often a connection adds its byte counts to the shared counters.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How often `on_outage: close_existing` re-checks admission, besides
/// reacting at once to service-state changes: a dependency this listener
/// needs can go down while the service state stays the same.
const OUTAGE_POLL: Duration = Duration::from_secs(1);
/// Most bytes a rejected connection's already-received data is drained of
/// before closing (so the close is a FIN, not an RST for unread data).
const REJECT_DRAIN_MAX: usize = 64 * 1024;

/// How long a refused connection is held: `reject_delay` scaled into its
/// upper half by `unit` (uniform in [0, 1)), so clients refused together do
/// not all come back in the same instant, and none comes back sooner than
/// half the delay.
pub fn hold_time(reject_delay: Duration, unit: f64) -> Duration {
    reject_delay.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

/// Serves one worker's socket of a `protocol: tcp` listener until drained.
///
/// Runs inside a `tokio::task::LocalSet` on the worker's current-thread
/// runtime. Returns once the drain signal fired and every connection ended
/// (or the drain deadline passed, after which the rest are closed).
pub async fn serve(listener: TcpListener, live: LiveCtx, mut drain: DrainSignal) {
    let worker = Rc::new(Worker::new(live.load_full(), live));
    let outages = tokio::task::spawn_local(watch_outages(worker.clone()));
    let name = worker.ctx.config.name.clone();
    let deadline = accept::run(&listener, &name, &worker.permits, &mut drain, &worker).await;
    // Outages no longer close connections once the drain began; held
    // refused connections are ended now.
    outages.abort();
    worker.draining.send_replace(true);

    // Stop accepting: closing the socket makes the kernel refuse new clients
    // (the other workers' sockets close on the same signal).
    drop(listener);
    debug!(listener = %name, connections = worker.permits.held(), "tcp drain: waiting for connections");
    if timeout_at(deadline, worker.permits.all_returned()).await.is_err() {
        debug!(listener = %name, connections = worker.permits.held(), "tcp drain: deadline; closing connections");
        // Each connection cuts its session (recording its metrics) as soon
        // as it sees the signal.
        worker.stop.send_replace(true);
        worker.permits.all_returned().await;
    }
}

/// Keeps the listener's `paused` gauge current and, with `on_outage:
/// close_existing`, closes the worker's connections, when the service state
/// changes and every [`OUTAGE_POLL`] (a dependency this listener needs can
/// go down while the service state stays the same).
async fn watch_outages(worker: Rc<Worker>) {
    let mut service = worker.ctx.health.subscribe_service();
    let mut service_open = true;
    let mut outage_poll = tokio::time::interval(OUTAGE_POLL);
    outage_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = service.changed(), if service_open => {
                service_open = changed.is_ok();
                worker.on_state();
            }
            _ = outage_poll.tick() => worker.on_state(),
        }
    }
}

// === impl Worker ===

/// A worker's state for one listener: metric handles resolved once, the
/// buffer pool and the signal that closes existing connections.
struct Worker {
    /// The context at start: the listener's name (a reload refuses to change it).
    ctx: Arc<ListenerCtx>,
    /// The context in force: what an admission needs.
    live: LiveCtx,
    accepted: Counter,
    rejected: Counter,
    upstream_error: Counter,
    /// Established connections cut by `on_outage: close_existing`.
    outage_closes: Counter,
    /// 1 while this listener refuses new connections (all workers set it alike).
    paused: Gauge,
    /// Refused connections held, all workers together; like the permits,
    /// `inc` returning the previous value makes it the `reject_hold_max` cap.
    held: Gauge,
    bytes_in: Counter,
    bytes_out: Counter,
    duration: AtomicHistogram,
    /// Idle relay buffers, reused to avoid allocating (and zeroing) per connection.
    buffers: RefCell<Vec<Box<[u8]>>>,
    /// This worker's share of the listener's connection permits.
    permits: Rc<Permits>,
    /// Bumped to close every existing connection (`on_outage: close_existing`).
    cut: watch::Sender<u64>,
    /// Set at the drain deadline: every connection is dropped at once.
    stop: watch::Sender<bool>,
    /// Set when the drain begins: held refused connections are ended.
    draining: watch::Sender<bool>,
}

impl Worker {
    fn new(ctx: Arc<ListenerCtx>, live: LiveCtx) -> Worker {
        let m = &ctx.registry;
        let name = &ctx.config.name;
        let outcome = |o: &str| {
            m.tcp_connections.get_or_create_owned(&TcpOutcomeLabels { listener: name.clone(), outcome: o.into() })
        };
        let bytes =
            |d: &str| m.tcp_bytes.get_or_create_owned(&TcpBytesLabels { listener: name.clone(), direction: d.into() });
        Worker {
            accepted: outcome("accepted"),
            rejected: outcome("rejected"),
            upstream_error: outcome("upstream_error"),
            outage_closes: m.tcp_outage_closes.get_or_create_owned(&ListenerLabels { listener: name.clone() }),
            paused: m.tcp_paused.get_or_create_owned(&ListenerLabels { listener: name.clone() }),
            held: m.tcp_held_connections.get_or_create_owned(&ListenerLabels { listener: name.clone() }),
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            duration: m.tcp_connection_duration.get_or_create_owned(&ListenerLabels { listener: name.clone() }),
            buffers: RefCell::new(Vec::new()),
            permits: Permits::new(&live),
            cut: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            draining: watch::Sender::new(false),
            ctx,
            live,
        }
    }

    /// Why a new connection would be refused now, with the mask of the
    /// needed dependencies that are not up; `None` when it is admitted.
    fn refusal(&self, draw: bool) -> Option<(Reject, u64)> {
        let live = self.live.load();
        let needs = live.default_route.needs;
        match if draw { live.admission(needs) } else { live.gate(needs) } {
            Admission::Admit => None,
            Admission::Reject(Reject::Degraded, _) if live.config.tcp.admit_degraded => None,
            Admission::Reject(reason, missing) => Some((reason, missing)),
        }
    }

    /// On a state change (or poll): sets the `paused` gauge and, with
    /// `on_outage: close_existing`, closes this worker's connections while
    /// the listener's needed dependencies put it out of service.
    fn on_state(&self) {
        let refusal = self.refusal(false);
        let paused = i64::from(refusal.is_some());
        // `set` swaps atomically: of the workers, only the first to see the
        // change logs it.
        if self.paused.get() != paused && self.paused.set(paused) != paused {
            match refusal {
                Some((reason, missing)) => {
                    info!(listener = %self.ctx.config.name, ?reason, missing, "tcp listener paused: refusing new connections")
                }
                None => info!(listener = %self.ctx.config.name, "tcp listener resumed: admitting connections"),
            }
        }
        if self.live.load().config.tcp.on_outage != TcpOnOutage::CloseExisting || self.permits.held() == 0 {
            return;
        }
        // Only out of service cuts: a degraded refusal (`admit_degraded: false`) keeps what is open.
        if let Some((Reject::OutOfService, missing)) = refusal {
            debug!(listener = %self.ctx.config.name, connections = self.permits.held(), missing, "tcp outage: closing existing connections");
            self.cut.send_modify(|epoch| *epoch += 1);
        }
    }

    /// A slot for holding one more refused connection, or `None` at
    /// `reject_hold_max` (the gauge is then left as it was).
    fn hold_slot(self: &Rc<Self>) -> Option<HoldSlot> {
        let max = i64::try_from(self.live.load().config.tcp.reject_hold_max).unwrap_or(i64::MAX);
        if self.held.inc() >= max {
            self.held.dec();
            return None;
        }
        Some(HoldSlot(self.held.clone()))
    }

    /// Two relay buffers, from the pool when possible.
    fn take_buffers(&self) -> [Box<[u8]>; 2] {
        let mut pool = self.buffers.borrow_mut();
        let mut one = || pool.pop().unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice());
        [one(), one()]
    }

    /// Returns buffers to the pool (or frees them when it is full).
    fn return_buffers(&self, bufs: [Box<[u8]>; 2]) {
        let mut pool = self.buffers.borrow_mut();
        for b in bufs {
            if pool.len() < POOL_MAX {
                pool.push(b);
            }
        }
    }
}

// === impl Serve ===

impl Serve for Rc<Worker> {
    /// Admission at accept: out of service (or degraded with
    /// `admit_degraded: false`) ends the connection per `reject`, at once
    /// or after holding it for `reject_delay`.
    fn admit(&self, stream: &TcpStream, peer: SocketAddr) -> bool {
        // What the config in force needs, and how it refuses (`reject`, `admit_degraded`).
        let live = self.live.load();
        let tcp = &live.config.tcp;
        let Some((reason, missing)) = self.refusal(true) else { return true };
        if !tcp.reject_delay.is_zero()
            && !*self.draining.borrow()
            && let Some(slot) = self.hold_slot()
        {
            // The accept loop drops (closes) its handle when we return false;
            // a duplicate of the socket keeps the connection for the hold.
            match socket2::SockRef::from(stream)
                .try_clone()
                .map(std::net::TcpStream::from)
                .and_then(TcpStream::from_std)
            {
                Ok(dup) => {
                    let wait = hold_time(tcp.reject_delay, rand::random::<f64>());
                    debug!(listener = %self.ctx.config.name, %peer, ?reason, missing, ?wait, "tcp connection refused; holding it");
                    tokio::task::spawn_local(hold(self.clone(), dup, peer, wait, slot));
                    return false;
                }
                Err(e) => {
                    debug!(listener = %self.ctx.config.name, %peer, error = %e, "tcp hold: cannot duplicate the socket")
                }
            }
        }
        self.rejected.inc();
        debug!(listener = %self.ctx.config.name, %peer, ?reason, missing, "tcp connection rejected");
        end_client(stream, tcp.reject);
        false
    }

    fn serve(&self, stream: TcpStream, peer: SocketAddr, permit: Permit) {
        tokio::task::spawn_local(connection(self.clone(), stream, peer, permit));
    }
}

// === hold ===

/// A refused connection's place under `reject_hold_max`; returned on drop.
struct HoldSlot(Gauge);

impl Drop for HoldSlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Holds a refused connection unread for `wait`, then ends it per `reject`.
/// Its dependencies recovering meanwhile (seen at once on a service-state
/// change, within [`OUTAGE_POLL`] otherwise, and at the end of the hold)
/// gets it served instead, with the bytes the client sent still unread; the
/// drain ends it at once.
async fn hold(worker: Rc<Worker>, stream: TcpStream, peer: SocketAddr, wait: Duration, slot: HoldSlot) {
    let until = Instant::now() + wait;
    let mut draining = worker.draining.subscribe();
    // Its own re-check, not the listener's last verdict: that can be a
    // poll old, and a dependency can go down and back up in between.
    let mut service = worker.ctx.health.subscribe_service();
    let mut service_open = true;
    let mut poll = tokio::time::interval_at(Instant::now() + OUTAGE_POLL, OUTAGE_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let drained = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break false,
            _ = draining.wait_for(|d| *d) => break true,
            changed = service.changed(), if service_open => service_open = changed.is_ok(),
            _ = poll.tick() => {}
        }
        if worker.refusal(true).is_none() {
            break false;
        }
    };
    drop(slot);
    if !drained
        && worker.refusal(true).is_none()
        && let Some(permit) = worker.permits.try_take()
    {
        debug!(listener = %worker.ctx.config.name, %peer, "tcp held connection admitted: dependencies recovered");
        tokio::task::spawn_local(connection(worker.clone(), stream, peer, permit));
        return;
    }
    worker.rejected.inc();
    debug!(listener = %worker.ctx.config.name, %peer, "tcp held connection rejected");
    end_client(&stream, worker.live.load().config.tcp.reject);
}

// === connection ===

/// Which end of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both directions reached end-of-stream.
    Done,
    /// No traffic either way for `idle_timeout`.
    Idle,
    /// Cut by healthgate: the listener's needed dependencies put it out
    /// of service (`close_existing`).
    Outage,
    /// Cut by healthgate: the drain deadline passed.
    Stopped,
    /// A read or write on this side failed (typically a reset).
    Failed(Side),
}

/// One admitted client connection: connect upstream, relay, record.
async fn connection(worker: Rc<Worker>, client: TcpStream, peer: SocketAddr, permit: Permit) {
    let _permit = permit;
    // The config in force as the session starts: it keeps these settings for
    // its life, a reload applies to later sessions.
    let config = &worker.live.load_full().config;
    let tcp = &config.tcp;
    // Subscribed before connecting, so an outage during the connect counts;
    // `stop` is read by value, so a deadline that passed before this task
    // first ran is seen too.
    let mut cut = worker.cut.subscribe();
    let mut stop = worker.stop.subscribe();
    let connect_deadline = Instant::now() + tcp.connect_timeout;
    let upstream = tokio::select! {
        r = net::connect(&config.upstream, connect_deadline) => r,
        _ = cut.changed() => {
            worker.rejected.inc();
            end_client(&client, tcp.reject);
            return;
        }
        _ = stop.wait_for(|stop| *stop) => {
            end_client(&client, tcp.reject);
            return;
        }
    };
    let mut upstream = match upstream {
        Ok((stream, _)) => stream,
        Err(e) => {
            worker.upstream_error.inc();
            debug!(listener = %worker.ctx.config.name, %peer, cause = e.kind().as_str(), error = %e, "tcp upstream connect failed");
            end_client(&client, tcp.reject);
            return;
        }
    };
    worker.accepted.inc();
    let mut client = client;
    let mut record = Record::new(worker.clone());
    let end = {
        let Record { traffic, buffers, .. } = &mut record;
        let cuts = Cuts { outage: &mut cut, stop: &mut stop };
        relay(&worker, &mut client, &mut upstream, buffers, traffic, config.idle_timeout, cuts).await
    };
    debug!(listener = %worker.ctx.config.name, %peer, ?end, bytes_in = record.traffic.total[0].get(),
        bytes_out = record.traffic.total[1].get(), "tcp connection ended");
    match end {
        End::Done | End::Idle => {}
        // A cut session is incomplete: the app gets a reset (a FIN could
        // make it act on a truncated request); the client what `reject` says.
        End::Outage | End::Stopped => {
            if end == End::Outage {
                worker.outage_closes.inc();
            }
            reset(&upstream);
            end_client(&client, tcp.reject);
        }
        // Pass a reset on: a FIN would let the other side take a truncated
        // stream for a complete one.
        End::Failed(Side::Client) => reset(&upstream),
        End::Failed(Side::Upstream) => reset(&client),
    }
}

/// A relayed connection's byte counts and timing; recorded on drop, so a
/// connection aborted at the drain deadline is still counted.
struct Record {
    worker: Rc<Worker>,
    started: Instant,
    traffic: Traffic,
    buffers: [Box<[u8]>; 2],
}

impl Record {
    fn new(worker: Rc<Worker>) -> Record {
        let buffers = worker.take_buffers();
        Record { worker, started: Instant::now(), traffic: Traffic::new(), buffers }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.traffic.flush(&self.worker);
        self.worker.duration.observe(self.started.elapsed());
        let bufs = std::mem::take(&mut self.buffers);
        self.worker.return_buffers(bufs);
    }
}

/// Per-connection traffic, shared by the two directions of one task.
struct Traffic {
    /// When bytes last moved either way.
    last: Cell<Instant>,
    /// Bytes not yet added to the shared counters: [in, out].
    pending: [Cell<u64>; 2],
    /// Bytes relayed so far: [in, out].
    total: [Cell<u64>; 2],
}

impl Traffic {
    fn new() -> Traffic {
        Traffic { last: Cell::new(Instant::now()), pending: Default::default(), total: Default::default() }
    }

    #[inline]
    fn record(&self, dir: usize, n: usize) {
        let n = n as u64;
        self.pending[dir].set(self.pending[dir].get() + n);
        self.total[dir].set(self.total[dir].get() + n);
        self.last.set(Instant::now());
    }

    fn flush(&self, worker: &Worker) {
        let take = |c: &Cell<u64>| c.replace(0);
        let (i, o) = (take(&self.pending[0]), take(&self.pending[1]));
        if i > 0 {
            worker.bytes_in.inc_by(i);
        }
        if o > 0 {
            worker.bytes_out.inc_by(o);
        }
    }
}

/// What makes healthgate cut a relayed session.
struct Cuts<'a> {
    /// Bumped by `on_outage: close_existing`.
    outage: &'a mut watch::Receiver<u64>,
    /// Set at the drain deadline.
    stop: &'a mut watch::Receiver<bool>,
}

/// Relays both directions until both ended, one failed, the connection was
/// idle too long, or healthgate cuts it.
async fn relay(
    worker: &Worker,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    buffers: &mut [Box<[u8]>; 2],
    traffic: &Traffic,
    idle: Duration,
    cuts: Cuts<'_>,
) -> End {
    let (mut client_r, mut client_w) = client.split();
    let (mut upstream_r, mut upstream_w) = upstream.split();
    let [buf_in, buf_out] = buffers;
    let inbound = pump(&mut client_r, &mut upstream_w, buf_in, traffic, 0);
    let outbound = pump(&mut upstream_r, &mut client_w, buf_out, traffic, 1);
    tokio::pin!(inbound, outbound);
    let (mut in_done, mut out_done) = (false, false);
    // One timer per connection, re-armed only when it fires (not per read):
    // it flushes the byte counts and checks idleness against `traffic.last`.
    let timer = sleep(idle.min(FLUSH_EVERY));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = &mut inbound, if !in_done => match r {
                Ok(()) => in_done = true,
                Err(side) => return End::Failed(side.of(0)),
            },
            r = &mut outbound, if !out_done => match r {
                Ok(()) => out_done = true,
                Err(side) => return End::Failed(side.of(1)),
            },
            _ = &mut timer => {
                let idle_at = traffic.last.get() + idle;
                let now = Instant::now();
                if now >= idle_at {
                    return End::Idle;
                }
                traffic.flush(worker);
                timer.as_mut().reset(idle_at.min(now + FLUSH_EVERY));
            }
            Ok(()) = cuts.outage.changed() => return End::Outage,
            _ = cuts.stop.wait_for(|stop| *stop) => return End::Stopped,
        }
        if in_done && out_done {
            return End::Done;
        }
    }
}

/// Which stage of a pump failed: its read or its write.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Read,
    Write,
}

impl Stage {
    /// The side a failure belongs to, for direction `dir` (0: client → app).
    fn of(self, dir: usize) -> Side {
        match (self, dir) {
            (Stage::Read, 0) | (Stage::Write, 1) => Side::Client,
            _ => Side::Upstream,
        }
    }
}

/// Copies one direction until end-of-stream, then shuts the writer down so
/// the other side sees the half-close; the other direction keeps flowing.
async fn pump<R, W>(r: &mut R, w: &mut W, buf: &mut [u8], traffic: &Traffic, dir: usize) -> Result<(), Stage>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let n = r.read(buf).await.map_err(|_| Stage::Read)?;
        if n == 0 {
            return w.shutdown().await.map_err(|_| Stage::Write);
        }
        w.write_all(&buf[..n]).await.map_err(|_| Stage::Write)?;
        traffic.record(dir, n);
    }
}

/// Ends a client connection we will not serve, the way `reject` says.
fn end_client(stream: &TcpStream, how: TcpReject) {
    match how {
        TcpReject::Reset => reset(stream),
        TcpReject::Close => {
            let sock = socket2::SockRef::from(stream);
            // FIN now, so the client sees end-of-stream at once...
            let _ = sock.shutdown(Shutdown::Write);
            // ...and discard what it already sent: closing a socket with
            // unread data makes the kernel send RST instead of a clean close.
            let mut scratch = [0u8; 4096];
            let mut drained = 0;
            while drained < REJECT_DRAIN_MAX {
                match (&*sock).read(&mut scratch) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        }
    }
}

/// Makes the coming close an RST (SO_LINGER 0).
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::state::Health;
    use std::path::Path;

    fn ctx(max: usize) -> Arc<ListenerCtx> {
        let yaml = format!(
            "listeners:\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n    max_connections: {max}\n"
        );
        let c = Config::from_yaml(&yaml, Path::new("t")).unwrap();
        ListenerCtx::new(&c, 0, Health::new(&c), Metrics::new(&c))
    }

    #[test]
    fn failures_are_attributed_to_the_side_that_failed() {
        // Direction 0 reads the client and writes the app; direction 1 the reverse.
        assert_eq!(Stage::Read.of(0), Side::Client);
        assert_eq!(Stage::Write.of(0), Side::Upstream);
        assert_eq!(Stage::Read.of(1), Side::Upstream);
        assert_eq!(Stage::Write.of(1), Side::Client);
    }

    #[test]
    fn a_refused_connection_is_held_between_half_and_all_of_reject_delay() {
        let d = Duration::from_secs(2);
        assert_eq!(hold_time(d, 0.0), Duration::from_secs(1));
        assert_eq!(hold_time(d, 0.5), Duration::from_millis(1500));
        assert!(hold_time(d, 0.999_999) < d);
        // Out-of-range draws stay within the bounds.
        assert_eq!(hold_time(d, -1.0), Duration::from_secs(1));
        assert_eq!(hold_time(d, 7.0), d);
        assert_eq!(hold_time(Duration::ZERO, 0.7), Duration::ZERO);
    }

    #[test]
    fn held_refused_connections_are_capped_by_reject_hold_max_across_workers() {
        let yaml = "listeners:\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n    \
                    reject_delay: 1s\n    reject_hold_max: 2\n";
        let c = Config::from_yaml(yaml, Path::new("t")).unwrap();
        let ctx = ListenerCtx::new(&c, 0, Health::new(&c), Metrics::new(&c));
        let (a, b) = (
            Rc::new(Worker::new(ctx.clone(), crate::proxy::live(ctx.clone()))),
            Rc::new(Worker::new(ctx.clone(), crate::proxy::live(ctx))),
        );
        let one = a.hold_slot().expect("first slot");
        let two = b.hold_slot().expect("second slot, on another worker");
        assert!(a.hold_slot().is_none() && b.hold_slot().is_none(), "the cap is listener-wide");
        assert_eq!(a.held.get(), 2);
        drop(one);
        let three = b.hold_slot().expect("a returned slot is free again");
        drop((two, three));
        assert_eq!(a.held.get(), 0);
    }

    #[test]
    fn relay_buffers_are_reused_and_the_pool_is_bounded() {
        let c = ctx(1);
        let w = Worker::new(c.clone(), crate::proxy::live(c));
        let bufs = w.take_buffers();
        let ptr = bufs[0].as_ptr();
        w.return_buffers(bufs);
        let again = w.take_buffers();
        assert!(again.iter().any(|b| b.as_ptr() == ptr), "a returned buffer is handed out again");
        for _ in 0..POOL_MAX {
            w.return_buffers([vec![0u8; 1].into_boxed_slice(), vec![0u8; 1].into_boxed_slice()]);
        }
        assert_eq!(w.buffers.borrow().len(), POOL_MAX);
    }
}
