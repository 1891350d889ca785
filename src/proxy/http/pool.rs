//! The worker's pool of idle keep-alive connections to the app, and
//! opening new ones.

use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use super::Worker;
use super::body::ReqBody;
use super::forward::Fail;
use crate::net;

/// An idle upstream connection.
pub(super) struct Pooled {
    pub(super) tx: SendRequest<ReqBody>,
    pub(super) since: Instant,
}

impl Worker {
    /// An idle pooled connection ready for a request, if any, and how long it was idle.
    pub(super) fn checkout(&self) -> Option<(SendRequest<ReqBody>, Duration)> {
        let mut pool = self.pool.borrow_mut();
        let now = Instant::now();
        while let Some(mut p) = pool.pop_back() {
            if self.upstream_idle_timeout.is_some_and(|t| p.since + t <= now) {
                // The newest one expired, so did every older one.
                pool.clear();
                return None;
            }
            // One poll: a connection still busy (e.g. the app answered before
            // the request body was sent in full) is not reusable; drop it.
            let waker = std::task::Waker::noop();
            if let Poll::Ready(Ok(())) = p.tx.poll_ready(&mut Context::from_waker(waker)) {
                return Some((p.tx, now - p.since));
            }
        }
        None
    }

    /// Returns a connection whose exchange completed to the pool.
    pub(super) fn checkin(&self, tx: SendRequest<ReqBody>) {
        let max = self.ctx.config.http.upstream_pool_max_idle;
        if max == 0 || tx.is_closed() {
            return;
        }
        let mut pool = self.pool.borrow_mut();
        if pool.len() >= max {
            pool.pop_front();
        }
        pool.push_back(Pooled { tx, since: Instant::now() });
    }

    /// Opens a new upstream connection (resolving the host each time, every
    /// address tried, bounded by `upstream_connect_timeout`).
    pub(super) async fn connect(&self) -> Result<SendRequest<ReqBody>, Fail> {
        let budget = self.connect_timeout.unwrap_or(Duration::from_secs(3600));
        let deadline = Instant::now() + budget;
        let upstream = &self.ctx.config.upstream;
        let addrs = net::resolve(upstream, deadline).await.map_err(|e| {
            debug!(upstream = %upstream.host, error = %e, "upstream resolve failed");
            Fail::Connect
        })?;
        let (stream, _) = net::connect_addrs(&addrs, deadline).await.map_err(|e| {
            debug!(error = %e, "upstream connect failed");
            Fail::Connect
        })?;
        let (tx, conn) = self.client.handshake(TokioIo::new(stream)).await.map_err(|e| {
            debug!(error = %e, "upstream handshake failed");
            Fail::Connect
        })?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }
}

/// Closes idle upstream connections once they are `upstream_idle_timeout`
/// old (dropping the last `SendRequest` ends hyper's connection task).
pub(super) async fn sweep_pool(w: Rc<Worker>) {
    let Some(timeout) = w.upstream_idle_timeout else { return };
    loop {
        let next = w.pool.borrow().front().map(|p| p.since + timeout);
        sleep_until(next.unwrap_or_else(|| Instant::now() + timeout)).await;
        let now = Instant::now();
        let mut pool = w.pool.borrow_mut();
        while pool.front().is_some_and(|p| p.since + timeout <= now) {
            pool.pop_front();
        }
        pool.retain(|p| !p.tx.is_closed());
    }
}
