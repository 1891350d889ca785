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
use super::{Cause, Check, CheckError, Details, NodeStatus, most_telling};
use crate::config::DependencyConfig;
pub use crate::config::{AmqpNode, AmqpSettings, Require};

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
    /// The node's abandoned connections still closing in the background.
    abandoned: Arc<std::sync::atomic::AtomicUsize>,
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
                debug!(node = %node.address, cause = %e.cause, "waiting amqp connection died; connecting afresh");
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
        if let Err(e) = c.drain(deadline).await {
            // A broker flooding an idle connection: the verdict is its own,
            // and the connection is dropped (not closed: that would read more).
            return (Err(e), c.version.clone());
        }
        if c.dead {
            debug!(node = %node.address, "amqp connection closed while idle; reconnecting");
            existing = None;
        } else if c.dirty {
            existing.take().expect("checked above").abandon(&slot.abandoned);
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
        conn.new_exchange();
        match conn.round_trip(&shared.queues, deadline).await {
            Ok(()) => {
                slot.conn = Some(conn);
                return (Ok(()), version);
            }
            Err(e) if reused && conn.dead && !retried && matches!(e.cause, Cause::Reset | Cause::ServerError) => {
                // An idle connection the broker dropped (EOF, reset,
                // CONNECTION_FORCED) is not an outage; judge a fresh one. A
                // timeout is not retried: the broker is there but silent.
                debug!(node = %node.address, cause = %e.cause, "amqp connection went stale; reconnecting once");
                retried = true;
            }
            Err(e) => {
                if conn.dead {
                    drop(conn);
                } else if conn.dirty {
                    conn.abandon(&slot.abandoned);
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
            secrets: Default::default(),
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

    fn secrets(&self) -> Vec<String> {
        self.shared.secrets.snapshot()
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
    fn heartbeat_defaults_to_the_check_gap_and_zero_disables_it() {
        let (s, dep) = settings("    url: amqp://h/\n    heartbeat: 0s\n").unwrap();
        assert_eq!(AmqpCheck::new(s, &dep).heartbeat(), 0);
        // interval 2s * 1.1 jitter + 1s timeout = 3.2s → 4s.
        let (s, dep) = settings("    url: amqp://h/\n").unwrap();
        assert_eq!(AmqpCheck::new(s, &dep).heartbeat(), 4);
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
