//! The worker's parking lot: idle keep-alive client connections held as
//! bare sockets, watched by one task for the whole worker.
//!
//! A parked connection costs a slot here (its file descriptor, its
//! connection permit, the client's address, when it became idle: 56 bytes)
//! and an entry in the parking order, rather than a task with its future,
//! its timer, its per-connection state and the runtime's registration of
//! its socket (256 bytes each, allocated when the connection opened and so
//! scattered among the allocations of every request served since). The
//! socket leaves the runtime's poller for the lot's own (an epoll instance
//! of its own, itself watched by the runtime), so a thousand idle clients
//! cost the process about 80 KiB. When the client sends a byte, the
//! connection returns to the runtime and gets a fresh task (see
//! `serve_http1`); when it closes, the lot closes it without one. Parking
//! and returning cost two `epoll_ctl` calls each, paid only by clients idle
//! for longer than `PARK_AFTER`. The lot also closes its connections at
//! `client_idle_timeout` and by the drain's rule for idle connections, from
//! one timer: connections are parked in the order they became idle, so the
//! oldest one is due first.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::conn::{DrainIdle, TimerConfig, idle_due};
use crate::proxy::accept::Permit;

/// An idle client connection, as it enters and leaves the lot.
pub(super) struct ParkedConn {
    /// The client socket, registered with the runtime.
    pub(super) stream: TcpStream,
    /// Its share of the listener's `max_connections`.
    pub(super) permit: Permit,
    /// The client's address.
    pub(super) peer: IpAddr,
    /// When its last response ended.
    pub(super) idle_since: Instant,
}

/// A connection in the lot: its socket is out of the runtime.
struct Parked {
    stream: std::net::TcpStream,
    permit: Permit,
    peer: IpAddr,
    idle_since: Instant,
}

/// What a look at a parked socket found.
enum Seen {
    /// Nothing to read yet.
    Quiet,
    /// The client sent something.
    Bytes,
    /// The client closed the connection (or it failed).
    Gone,
}

/// Whether the client sent anything, without consuming it (the socket is
/// non-blocking).
fn look(stream: &std::net::TcpStream) -> Seen {
    loop {
        return match stream.peek(&mut [0]) {
            Ok(0) => Seen::Gone,
            Ok(_) => Seen::Bytes,
            // The poller reports edges: a look cut short must be retried,
            // or bytes that arrived would wait for the next ones.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Seen::Quiet,
            Err(_) => Seen::Gone,
        };
    }
}

/// A slot's identity, the poller's token: its index and the generation of
/// its occupant, so an event for a connection that already left finds
/// nothing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    fn token(self) -> Token {
        Token(((self.generation as usize) << 32) | self.index as usize)
    }

    fn of(token: Token) -> Key {
        Key { index: token.0 as u32, generation: (token.0 >> 32) as u32 }
    }
}

struct Slot {
    generation: u32,
    parked: Option<Parked>,
}

/// Events taken from the lot's poller per look; more wait for the next.
const EVENTS: usize = 256;

/// The parked connections of one worker.
pub(super) struct Lot {
    poller: AsyncFd<mio::Poll>,
    events: Events,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Parked connections in the order they were parked (oldest first), by
    /// key; keys of connections that left are skipped when met, and
    /// dropped in bulk when they outnumber the parked ones.
    order: VecDeque<(Instant, Key)>,
    len: usize,
    /// The lot task, woken when a connection is parked in an empty lot
    /// (its timer then needs arming).
    task: Option<Waker>,
    rearm: bool,
    gauge: Gauge,
}

/// Why [`Lot::park`] did not keep a connection.
pub(super) enum NotParked {
    /// The client already sent bytes (or the socket could not be watched):
    /// serve it.
    Ready(ParkedConn),
    /// The client closed it; it is closed.
    Gone,
}

impl Lot {
    /// An empty lot counting its connections in `gauge`; needs the
    /// runtime (its poller is watched by the runtime's).
    pub(super) fn new(gauge: Gauge) -> io::Result<Lot> {
        // tokio deprecated its safe constructor because an arbitrary `T`
        // may change or close the descriptor it reports while registered.
        // A `mio::Poll` owns its epoll descriptor for its whole life and
        // never exchanges it, and the lot only calls `poll` on it: the
        // condition of tokio's `unsafe` constructor holds.
        #[allow(deprecated)]
        let poller = AsyncFd::with_interest(mio::Poll::new()?, tokio::io::Interest::READABLE)?;
        Ok(Lot {
            poller,
            events: Events::with_capacity(EVENTS),
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            len: 0,
            task: None,
            rearm: false,
            gauge,
        })
    }

    /// Keeps `conn` until its client sends something or closes it, or it
    /// is due ([`Lot::close_due`]).
    pub(super) fn park(&mut self, conn: ParkedConn) -> Result<(), NotParked> {
        let ParkedConn { stream, permit, peer, idle_since } = conn;
        let Ok(stream) = stream.into_std() else { return Err(NotParked::Gone) };
        match look(&stream) {
            Seen::Quiet => {}
            Seen::Gone => return Err(NotParked::Gone),
            Seen::Bytes => {
                return back(Parked { stream, permit, peer, idle_since })
                    .map_or(Err(NotParked::Gone), |c| Err(NotParked::Ready(c)));
            }
        }
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot { generation: 0, parked: None });
            (self.slots.len() - 1) as u32
        });
        let key = Key { index, generation: self.slots[index as usize].generation };
        // Bytes that arrived since the look make the socket ready when it
        // is added: none are missed.
        let fd = stream.as_raw_fd();
        if let Err(e) = self.poller.get_ref().registry().register(&mut SourceFd(&fd), key.token(), Interest::READABLE) {
            debug!(error = %e, "cannot watch an idle connection; it keeps its task");
            self.free.push(index);
            return back(Parked { stream, permit, peer, idle_since })
                .map_or(Err(NotParked::Gone), |c| Err(NotParked::Ready(c)));
        }
        self.order.push_back((idle_since, key));
        self.slots[index as usize].parked = Some(Parked { stream, permit, peer, idle_since });
        self.len += 1;
        self.gauge.inc();
        if self.len == 1 {
            // The lot task sleeps without a deadline while the lot is empty.
            self.rearm = true;
            if let Some(task) = self.task.take() {
                task.wake();
            }
        }
        Ok(())
    }

    fn take(&mut self, key: Key) -> Option<Parked> {
        self.slot(key)?;
        let slot = &mut self.slots[key.index as usize];
        let parked = slot.parked.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
        self.len -= 1;
        self.gauge.dec();
        if self.order.len() > 2 * self.len + 64 {
            let slots = &self.slots;
            self.order.retain(|(_, k)| slots[k.index as usize].generation == k.generation);
        }
        Some(parked)
    }

    fn slot(&self, key: Key) -> Option<&Parked> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.parked.as_ref()
    }

    /// Waits until parked sockets became readable, and returns the
    /// connections whose clients sent bytes (those whose clients closed are
    /// closed here). Also ready, possibly with none, once a connection was
    /// parked in an empty lot: the caller then re-arms its timer.
    pub(super) fn poll_woken(&mut self, cx: &mut Context<'_>) -> Poll<Vec<ParkedConn>> {
        self.task = Some(cx.waker().clone());
        let mut ready = Vec::new();
        let mut keys = Vec::new();
        loop {
            let Lot { poller, events, .. } = self;
            let mut guard = match poller.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(guard)) => guard,
                // Not seen in practice: the idle timeout and the drain still close parked connections.
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "the parking lot's poller failed");
                    break;
                }
                Poll::Pending => break,
            };
            if let Err(e) = guard.get_inner_mut().poll(events, Some(Duration::ZERO)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    debug!(error = %e, "the parking lot's poller failed");
                }
                continue;
            }
            if events.iter().count() < EVENTS {
                guard.clear_ready();
            }
            keys.extend(events.iter().map(|e| Key::of(e.token())));
        }
        for key in keys {
            let seen = match self.slot(key) {
                Some(parked) => look(&parked.stream),
                None => continue,
            };
            match seen {
                Seen::Quiet => {}
                Seen::Gone => drop(self.take(key)),
                Seen::Bytes => {
                    let parked = self.take(key).expect("looked up above");
                    let fd = parked.stream.as_raw_fd();
                    let _ = self.poller.get_ref().registry().deregister(&mut SourceFd(&fd));
                    ready.extend(back(parked));
                }
            }
        }
        if ready.is_empty() && !std::mem::take(&mut self.rearm) {
            return Poll::Pending;
        }
        Poll::Ready(ready)
    }

    /// When the oldest parked connection is due to be closed (none: no
    /// connection is, or none will be).
    pub(super) fn next_due(&mut self, cfg: &TimerConfig, drain: Option<DrainIdle>) -> Option<Instant> {
        self.skip_departed();
        self.order.front().and_then(|&(since, _)| idle_due(since, cfg, drain))
    }

    /// Closes the connections due at `now` (idle timeout or the drain's
    /// rule); returns how many.
    pub(super) fn close_due(&mut self, now: Instant, cfg: &TimerConfig, drain: Option<DrainIdle>) -> usize {
        let mut closed = 0;
        loop {
            self.skip_departed();
            match self.order.front() {
                Some(&(since, key)) if idle_due(since, cfg, drain).is_some_and(|due| now >= due) => {
                    self.order.pop_front();
                    if self.take(key).is_some() {
                        closed += 1;
                    }
                }
                _ => return closed,
            }
        }
    }

    /// Closes every parked connection (stopped without a drain).
    pub(super) fn close_all(&mut self) {
        while let Some((_, key)) = self.order.pop_front() {
            self.take(key);
        }
    }

    fn skip_departed(&mut self) {
        while let Some(&(_, key)) = self.order.front() {
            if self.slot(key).is_some() {
                return;
            }
            self.order.pop_front();
        }
    }
}

/// A connection leaving the lot, its socket back in the runtime (none:
/// the runtime refused it, and the connection is closed).
fn back(parked: Parked) -> Option<ParkedConn> {
    let Parked { stream, permit, peer, idle_since } = parked;
    match TcpStream::from_std(stream) {
        Ok(stream) => Some(ParkedConn { stream, permit, peer, idle_since }),
        Err(e) => {
            debug!(error = %e, "cannot return a parked connection to the runtime; closing it");
            None
        }
    }
}

impl Drop for Lot {
    fn drop(&mut self) {
        self.gauge.dec_by(self.len as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::proxy::ListenerCtx;
    use crate::proxy::accept::Permits;
    use crate::state::Health;
    use std::path::Path;
    use std::rc::Rc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MS: Duration = Duration::from_millis(1);
    const WITHIN: Duration = Duration::from_secs(5);

    fn permits() -> Rc<Permits> {
        let yaml = "listeners:\n  - name: h\n    protocol: http\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n";
        let c = Config::from_yaml(yaml, Path::new("t")).unwrap();
        Permits::new(&crate::proxy::live(ListenerCtx::new(&c, 0, Health::new(&c), Metrics::new(&c))))
    }

    fn cfg(idle_ms: Option<u64>) -> TimerConfig {
        TimerConfig { header_read_timeout: None, client_idle_timeout: idle_ms.map(|m| MS * m as u32), tick: MS * 100 }
    }

    /// A parked server side of a fresh loopback connection, and its client.
    async fn parked(permits: &Rc<Permits>, idle_since: Instant) -> (ParkedConn, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (stream, _) = l.accept().await.unwrap();
        let permit = permits.try_take().expect("a permit");
        (ParkedConn { stream, permit, peer: [127, 0, 0, 1].into(), idle_since }, client)
    }

    async fn woken(lot: &mut Lot) -> Vec<ParkedConn> {
        let wait = std::future::poll_fn(|cx| match lot.poll_woken(cx) {
            Poll::Ready(v) if v.is_empty() => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            p => p,
        });
        tokio::time::timeout(WITHIN, wait).await.expect("a parked client woke up")
    }

    #[tokio::test]
    async fn a_client_that_sends_gets_its_connection_back_with_the_bytes_unread() {
        let (gauge, permits) = (Gauge::default(), permits());
        let mut lot = Lot::new(gauge.clone()).unwrap();
        let (conn, mut client) = parked(&permits, Instant::now()).await;
        assert!(lot.park(conn).is_ok());
        assert_eq!(gauge.get(), 1);
        client.write_all(b"GET").await.unwrap();
        let mut back = woken(&mut lot).await;
        assert_eq!((back.len(), gauge.get(), permits.held()), (1, 0, 1), "left the lot, permit still held");
        let mut buf = [0; 3];
        back[0].stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET", "the lot only peeked");
    }

    #[tokio::test]
    async fn a_client_that_closes_is_closed_by_the_lot_and_returns_its_permit() {
        let (gauge, permits) = (Gauge::default(), permits());
        let mut lot = Lot::new(gauge.clone()).unwrap();
        let (conn, client) = parked(&permits, Instant::now()).await;
        assert!(lot.park(conn).is_ok());
        drop(client);
        let wait = std::future::poll_fn(|cx| {
            let woken = lot.poll_woken(cx);
            assert!(!matches!(woken, Poll::Ready(v) if !v.is_empty()), "nothing to serve");
            if gauge.get() == 0 {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        tokio::time::timeout(WITHIN, wait).await.expect("the close was noticed");
        assert_eq!(permits.held(), 0);
    }

    #[tokio::test]
    async fn a_client_already_sending_is_not_parked() {
        let (gauge, permits) = (Gauge::default(), permits());
        let mut lot = Lot::new(gauge.clone()).unwrap();
        let (conn, mut client) = parked(&permits, Instant::now()).await;
        client.write_all(b"G").await.unwrap();
        // The byte may take a moment to arrive on loopback.
        let readable = tokio::time::timeout(WITHIN, conn.stream.readable()).await;
        assert!(readable.is_ok(), "the byte arrived");
        match lot.park(conn) {
            Err(NotParked::Ready(_)) => {}
            Err(NotParked::Gone) => panic!("the client is there"),
            Ok(()) => panic!("parked a connection with bytes waiting"),
        }
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn connections_are_closed_oldest_first_at_the_idle_timeout_and_all_on_a_stop() {
        let (gauge, permits) = (Gauge::default(), permits());
        let mut lot = Lot::new(gauge.clone()).unwrap();
        let t0 = Instant::now();
        let (a, mut client_a) = parked(&permits, t0).await;
        let (b, _client_b) = parked(&permits, t0 + MS * 1000).await;
        let (c, _client_c) = parked(&permits, t0 + MS * 2000).await;
        for conn in [a, b, c] {
            assert!(lot.park(conn).is_ok());
        }
        let idle = cfg(Some(3000));
        assert_eq!(lot.next_due(&idle, None), Some(t0 + MS * 3000));
        assert_eq!(lot.close_due(t0 + MS * 2999, &idle, None), 0);
        assert_eq!(lot.close_due(t0 + MS * 3000, &idle, None), 1);
        assert_eq!(lot.next_due(&idle, None), Some(t0 + MS * 4000));
        let mut buf = [0; 1];
        let eof = tokio::time::timeout(WITHIN, client_a.read(&mut buf)).await.expect("closed at once");
        assert_eq!(eof.unwrap(), 0, "the oldest was closed");
        assert_eq!(lot.next_due(&cfg(None), None), None, "no idle limit, no drain: never due");
        let drain = DrainIdle { began: t0 + MS * 2500, delay: MS * 100 };
        assert_eq!(lot.next_due(&cfg(None), Some(drain)), Some(t0 + MS * 2600), "the drain's rule");
        lot.close_all();
        assert_eq!((gauge.get(), permits.held()), (0, 0));
    }

    #[test]
    fn a_parked_connection_costs_a_56_byte_slot_and_a_24_byte_order_entry() {
        assert_eq!(std::mem::size_of::<Slot>(), 56);
        assert_eq!(std::mem::size_of::<(Instant, Key)>(), 24);
    }

    #[tokio::test]
    async fn a_connection_parked_again_and_again_leaves_no_growing_trail() {
        let (gauge, permits) = (Gauge::default(), permits());
        let mut lot = Lot::new(gauge.clone()).unwrap();
        let (mut conn, mut client) = parked(&permits, Instant::now()).await;
        for i in 0..300u32 {
            assert!(lot.park(conn).is_ok());
            client.write_all(b"x").await.unwrap();
            let mut back = woken(&mut lot).await;
            conn = back.pop().expect("woken");
            let mut buf = [0; 1];
            conn.stream.read_exact(&mut buf).await.unwrap();
            assert!(lot.order.len() <= 2 * lot.len + 64 && lot.slots.len() == 1, "round {i}: {}", lot.order.len());
        }
        assert_eq!(gauge.get(), 0);
    }
}
