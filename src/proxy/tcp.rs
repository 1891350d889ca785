//! The tcp listener (being written).

use std::sync::Arc;

use tokio::net::TcpListener;

use super::{DrainSignal, ListenerCtx};

/// Serves one worker's socket of a `protocol: tcp` listener until drained.
///
/// Runs inside a `tokio::task::LocalSet` on the worker's current-thread
/// runtime. Returns once the drain signal fired and every connection ended
/// (or the drain deadline passed).
pub async fn serve(listener: TcpListener, ctx: Arc<ListenerCtx>, mut drain: DrainSignal) {
    let _ = (&listener, &ctx);
    let _ = drain.wait_for(|d| d.is_some()).await;
}
