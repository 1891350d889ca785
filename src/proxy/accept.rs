//! The accept loop of every listener (HTTP and TCP): connection permits,
//! holding a connection at the limit, backing off on lasting accept errors,
//! and stopping on the drain signal.
//!
//! A listener admits at most `max_connections` client connections, counted
//! over all its workers: each open connection holds a [`Permit`]. A
//! connection accepted while none is free is *held*: it stays unread, as it
//! would in the kernel backlog, and the worker accepts nothing else until a
//! permit frees up (its own connections wake it at once, another worker's
//! within [`PERMIT_RETRY`]). The protocol only says what to do with an
//! accepted connection ([`Serve`]).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tracing::{debug, warn};

use super::{DrainSignal, LiveCtx};

/// How often a worker holding a connection at `max_connections` re-checks
/// for a permit freed by another worker (its own connections wake it at once).
pub const PERMIT_RETRY: Duration = Duration::from_millis(50);
/// Pause after an accept error that lasts (e.g. out of file descriptors),
/// so the loop does not spin while the condition lasts.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a listener does with the connections its accept loop takes.
pub trait Serve {
    /// Whether a freshly accepted (or held) connection may be served. A
    /// connection turned away must be ended by this call; it is dropped
    /// right after. Asked again when a held connection gets its chance, as
    /// things may have changed while it waited.
    fn admit(&self, stream: &TcpStream, peer: SocketAddr) -> bool;

    /// Serves an admitted connection (typically spawns its task); the
    /// connection keeps `permit` for as long as it is open.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, permit: Permit);
}

/// One worker's share of a listener's connection permits.
///
/// The listener-wide count is the `active_connections` gauge itself: its
/// `inc` returns the previous value atomically, so two workers cannot both
/// take the last permit. This worker's own count tells the drain when its
/// connections are all gone.
pub struct Permits {
    /// Open client connections of the listener, all workers together.
    gauge: Gauge,
    /// The listener's context in force: `max_connections` is read from it at
    /// every accept, so a reload's new limit applies to new connections
    /// (lowered, it closes none of the open ones).
    live: LiveCtx,
    /// Permits this worker's connections hold.
    held: Cell<usize>,
    /// Signalled whenever one of this worker's permits is returned.
    returned: Notify,
}

impl Permits {
    /// This worker's permits of the listener whose context in force is `live`.
    pub fn new(live: &LiveCtx) -> Rc<Permits> {
        Rc::new(Permits {
            gauge: live.load().active_connections.clone(),
            live: live.clone(),
            held: Cell::new(0),
            returned: Notify::new(),
        })
    }

    /// Takes a permit, or `None` when the listener is at `max_connections`
    /// (the gauge is then left as it was).
    pub fn try_take(self: &Rc<Self>) -> Option<Permit> {
        let max = i64::try_from(self.live.load().config.max_connections).unwrap_or(i64::MAX);
        if self.gauge.inc() >= max {
            self.gauge.dec();
            return None;
        }
        self.held.set(self.held.get() + 1);
        Some(Permit(self.clone()))
    }

    /// Permits this worker's connections hold.
    pub fn held(&self) -> usize {
        self.held.get()
    }

    /// Resolves once every permit of this worker was returned.
    pub async fn all_returned(&self) {
        while self.held.get() > 0 {
            self.returned.notified().await;
        }
    }

    /// Resolves when a permit may have been freed: one of this worker's at
    /// once, another worker's within [`PERMIT_RETRY`].
    async fn maybe_free(&self) {
        tokio::select! {
            _ = self.returned.notified() => {}
            _ = sleep(PERMIT_RETRY) => {}
        }
    }
}

/// One of a listener's `max_connections` permits, held by an open client
/// connection (an upgraded tunnel included); returned on drop.
pub struct Permit(Rc<Permits>);

impl Drop for Permit {
    fn drop(&mut self) {
        let p = &self.0;
        p.held.set(p.held.get() - 1);
        p.gauge.dec();
        p.returned.notify_one();
    }
}

/// Accepts connections on `listener` and hands them to `serve` until the
/// drain signal fires; returns the drain deadline (now, if the signal's
/// sender is gone, as nobody could drain us any more).
///
/// When the signal fires, the connections the kernel already completed (up
/// to [`BACKLOG_AT_STOP`]) are still taken and served: closing the socket
/// with them queued would reset clients that may have sent a request
/// already. A held connection, and any beyond what free permits allow, is
/// dropped (closed).
pub async fn run(
    listener: &TcpListener,
    name: &str,
    permits: &Rc<Permits>,
    drain: &mut DrainSignal,
    serve: &impl Serve,
) -> Instant {
    let mut held: Option<(TcpStream, SocketAddr)> = None;
    loop {
        if let Some((stream, peer)) = held.take()
            && serve.admit(&stream, peer)
        {
            match permits.try_take() {
                Some(permit) => serve.serve(stream, peer, permit),
                None => held = Some((stream, peer)),
            }
        }
        tokio::select! {
            biased;
            d = drain.wait_for(Option::is_some) => {
                let deadline = d.ok().and_then(|d| *d).unwrap_or_else(Instant::now);
                serve_backlog(listener, permits, serve);
                return deadline;
            }
            _ = permits.maybe_free(), if held.is_some() => {}
            accepted = listener.accept(), if held.is_none() => match accepted {
                Ok((stream, peer)) => {
                    // Relay writes as they come: Nagle would hold back the
                    // small writes of request/response protocols.
                    let _ = stream.set_nodelay(true);
                    held = Some((stream, peer));
                }
                Err(e) if backs_off(&e) => {
                    warn!(listener = %name, error = %e, "accept failed; backing off");
                    sleep(ACCEPT_BACKOFF).await;
                }
                Err(e) => debug!(listener = %name, error = %e, "accept failed"),
            },
        }
    }
}

/// Most connections taken from a listener's backlog when it stops
/// accepting (its `listen` backlog size).
pub const BACKLOG_AT_STOP: usize = 1024;

/// Serves the connections already waiting in `listener`'s backlog, without
/// waiting for more; stops at the first one without a free permit.
fn serve_backlog(listener: &TcpListener, permits: &Rc<Permits>, serve: &impl Serve) {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..BACKLOG_AT_STOP {
        let Poll::Ready(Ok((stream, peer))) = listener.poll_accept(&mut cx) else { return };
        let _ = stream.set_nodelay(true);
        if !serve.admit(&stream, peer) {
            continue;
        }
        match permits.try_take() {
            Some(permit) => serve.serve(stream, peer, permit),
            None => return,
        }
    }
}

/// Whether an accept error lasts (out of file descriptors, buffers or
/// memory: EMFILE, ENFILE, ENOBUFS, ENOMEM, or anything unknown), so the
/// loop pauses for [`ACCEPT_BACKOFF`]. An aborted or reset connection
/// concerns that one client only: the next accept is tried at once.
pub fn backs_off(e: &io::Error) -> bool {
    !matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::proxy::{ListenerCtx, live};
    use crate::state::Health;
    use std::path::Path;
    use std::sync::Arc;

    fn config(max: usize) -> Config {
        let yaml = format!(
            "listeners:\n  - name: l4\n    protocol: tcp\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:1\n    max_connections: {max}\n"
        );
        Config::from_yaml(&yaml, Path::new("t")).unwrap()
    }

    fn listener(max: usize, metrics: &Arc<Metrics>) -> Arc<ListenerCtx> {
        let c = config(max);
        ListenerCtx::new(&c, 0, Health::new(&c), metrics.clone())
    }

    fn ctx(max: usize) -> LiveCtx {
        live(listener(max, &Metrics::new(&config(max))))
    }

    #[test]
    fn the_connection_limit_is_shared_by_every_worker_of_a_listener() {
        let live = ctx(2);
        let ctx = live.load_full();
        let (a, b) = (Permits::new(&live), Permits::new(&live));
        let first = a.try_take().expect("permit 1");
        let _second = b.try_take().expect("permit 2");
        assert!(a.try_take().is_none() && b.try_take().is_none());
        assert_eq!(ctx.active_connections.get(), 2, "a refused permit leaves the gauge as it was");
        assert_eq!((a.held(), b.held()), (1, 1));
        drop(first);
        assert_eq!(ctx.active_connections.get(), 1);
        assert_eq!(a.held(), 0);
        assert!(b.try_take().is_some());
    }

    #[tokio::test]
    async fn the_drain_sees_when_every_permit_is_returned() {
        let p = Permits::new(&ctx(4));
        let (one, two) = (p.try_take().unwrap(), p.try_take().unwrap());
        let wait = tokio::time::timeout(Duration::from_millis(20), p.all_returned()).await;
        assert!(wait.is_err(), "two permits still held");
        drop(one);
        drop(two);
        tokio::time::timeout(Duration::from_secs(5), p.all_returned()).await.expect("all returned");
    }

    #[test]
    fn a_reloaded_limit_applies_to_the_next_connection_and_closes_none() {
        let live = ctx(3);
        let metrics = live.load().registry.clone();
        let p = Permits::new(&live);
        let held: Vec<Permit> = (0..3).map(|_| p.try_take().unwrap()).collect();
        assert!(p.try_take().is_none());
        live.store(listener(5, &metrics));
        let more: Vec<Permit> = (0..2).map(|_| p.try_take().expect("raised limit")).collect();
        assert!(p.try_take().is_none());
        live.store(listener(2, &metrics));
        assert_eq!(p.held(), 5, "a lowered limit closes nothing");
        drop(more);
        drop(held);
        let _a = p.try_take().unwrap();
        let _b = p.try_take().unwrap();
        assert!(p.try_take().is_none(), "the lowered limit holds for new connections");
    }

    #[test]
    fn only_errors_of_one_client_are_retried_at_once() {
        let e = |k| io::Error::new(k, "x");
        assert!(!backs_off(&e(io::ErrorKind::ConnectionAborted)));
        assert!(!backs_off(&e(io::ErrorKind::ConnectionReset)));
        // EMFILE (24), ENFILE (23), ENOBUFS (105), ENOMEM (12).
        for errno in [24, 23, 105, 12] {
            assert!(backs_off(&io::Error::from_raw_os_error(errno)), "errno {errno}");
        }
    }
}
