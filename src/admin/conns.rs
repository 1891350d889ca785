//! The admin server's connection table: a hard cap on open connections that
//! sheds the oldest idle one to admit a new one.
//!
//! Why shed rather than refuse: a kubelet probe opens a new connection each
//! time and sends its request at once, so "newest wins" serves every probe
//! while clients that hold connections open without finishing a request
//! (idle keep-alive, slowloris, a flood of partial requests) are the ones
//! closed. A connection in the middle of a request is never shed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Largest read buffer hyper may grow per connection (its minimum): a request
/// head larger than this is refused, so a connection's memory stays bounded.
pub const MAX_BUF: usize = 8192;
/// Most request headers per request on the admin port.
pub const MAX_HEADERS: usize = 32;

/// One open connection's handles.
struct Entry {
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

/// A connection admitted by [`Table::admit`].
pub struct Slot {
    /// Its key in the table (connections are numbered in accept order).
    pub id: u64,
    /// Requests being handled (several at once on an HTTP/2 connection).
    pub busy: Arc<AtomicUsize>,
    /// Notified when the connection is shed.
    pub close: Arc<Notify>,
    /// Whether an older connection was shed to make room.
    pub shed_another: bool,
}

/// The open admin connections, oldest first.
#[derive(Clone)]
pub struct Table {
    inner: Arc<Mutex<(u64, BTreeMap<u64, Entry>)>>,
    max: usize,
}

/// The oldest connection not in a request, among `(id, busy)` in accept order.
pub fn victim(conns: impl IntoIterator<Item = (u64, bool)>) -> Option<u64> {
    conns.into_iter().find(|(_, busy)| !busy).map(|(id, _)| id)
}

impl Table {
    /// An empty table holding at most `max` connections.
    pub fn new(max: usize) -> Table {
        Table { inner: Arc::new(Mutex::new((0, BTreeMap::new()))), max: max.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, (u64, BTreeMap<u64, Entry>)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection, shedding the oldest idle one at the cap;
    /// `None` when every open connection is mid-request.
    pub fn admit(&self) -> Option<Slot> {
        let mut t = self.lock();
        let mut shed_another = false;
        if t.1.len() >= self.max {
            let id = victim(t.1.iter().map(|(id, e)| (*id, e.busy.load(Ordering::Relaxed) > 0)))?;
            if let Some(e) = t.1.remove(&id) {
                e.close.notify_one();
                shed_another = true;
            }
        }
        t.0 += 1;
        let id = t.0;
        let (busy, close) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        t.1.insert(id, Entry { busy: busy.clone(), close: close.clone() });
        Some(Slot { id, busy, close, shed_another })
    }

    /// Forgets a closed connection.
    pub fn remove(&self, id: u64) {
        self.lock().1.remove(&id);
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts one request in its connection's `busy` for as long as it lives.
pub struct Busy(Arc<AtomicUsize>);

impl Busy {
    /// Adds one to `count` until the guard drops.
    pub fn mark(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::Relaxed);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_connection_is_the_victim() {
        assert_eq!(victim([(1, true), (2, false), (3, false)]), Some(2));
        assert_eq!(victim([(1, true), (2, true)]), None);
        assert_eq!(victim([]), None);
    }

    #[test]
    fn at_the_cap_a_new_connection_sheds_the_oldest_idle_one() {
        let t = Table::new(2);
        let a = t.admit().unwrap();
        let b = t.admit().unwrap();
        let a_busy = Busy::mark(&a.busy);
        let c = t.admit().unwrap();
        assert!(c.shed_another);
        assert_eq!(t.len(), 2);
        // `b` was shed: its close signal is pending.
        let shed = b.close.notified();
        tokio::pin!(shed);
        assert!(futures_ready(shed.as_mut()));
        // Two requests at once on one (HTTP/2) connection: busy until both end.
        let (c1, c2) = (Busy::mark(&c.busy), Busy::mark(&c.busy));
        drop(c1);
        assert!(t.admit().is_none(), "every connection is mid-request");
        drop((c2, a_busy));
        t.remove(a.id);
        assert!(!t.admit().unwrap().shed_another);
    }

    /// Whether a future is ready on its first poll.
    fn futures_ready<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker)).is_ready()
    }
}
