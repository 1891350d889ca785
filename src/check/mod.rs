//! Dependency checks: one module per protocol behind the [`Check`] trait.
//!
//! A check knows how to probe its dependency once within a deadline and how to
//! close its connection cleanly. It knows nothing of intervals, thresholds or
//! state: the monitor loop (`crate::monitor`) owns those.
//!
//! Every failure carries a [`Cause`] from a fixed vocabulary, so metric labels
//! stay bounded and an operator can tell "refused" from "connect timeout" from
//! "the server answered, but not well". When several attempts fail (nodes of
//! a cluster, addresses of a name), [`most_telling`] picks the one to report.
//!
//! A check module receives finished, typed settings from `crate::config`
//! (where each type's keys, defaults and parsing live) and never sees YAML.
//! Adding a dependency type takes one settings file in
//! `crate::config::dependency`, one check module here, and one line in each
//! of the two enums: `DependencyKind` and [`AnyCheck`] (the `checks!` list
//! below).

pub mod amqp;
pub mod http;
pub mod io;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod tcp;
pub mod text;
pub mod tls;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::{DependencyConfig, DependencyKind};

/// How long work on a connection a check stopped waiting for (a late reply,
/// a clean close) may go on in the background before the connection is
/// simply dropped. Long, on purpose: a frozen server reads what we sent only
/// when it thaws, and a socket closed before that makes it log an abrupt
/// close (or count an aborted client).
pub const ABANDON_AFTER: Duration = Duration::from_secs(30);

/// Why a check failed: a bounded set of label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The host name did not resolve.
    Dns,
    /// Connection refused (nothing listening).
    Refused,
    /// The TCP connect did not complete in time (black-holed, frozen, filtered).
    ConnectTimeout,
    /// Connected, but the reply did not come in time.
    ReadTimeout,
    /// The peer reset or closed the connection unexpectedly.
    Reset,
    /// No route to the host or network.
    Unreachable,
    /// TLS handshake or certificate failure.
    Tls,
    /// Credentials rejected.
    Auth,
    /// The peer spoke something unexpected.
    Protocol,
    /// The server reported an error of its own.
    ServerError,
    /// HTTP status not in the expected set.
    UnexpectedStatus,
    /// HTTP body or TCP `expect` did not match.
    UnexpectedResponse,
    /// MySQL 1040.
    TooManyConnections,
    /// MySQL 1129: this host is blocked for too many connection errors.
    HostBlocked,
    /// The server is up but not ready to serve (read_only, Galera state, 1047).
    NotReady,
    /// Redis is loading its dataset.
    Loading,
    /// Redis replica lost its master (`-MASTERDOWN`).
    MasterDown,
    /// Redis is busy running a script (`-BUSY`).
    Busy,
    /// The node is not the master/primary that `require_role` asks for.
    NotMaster,
    /// AMQP virtual host missing or not allowed.
    Vhost,
    /// AMQP connection blocked by a resource alarm.
    Blocked,
    /// A required object (AMQP queue) does not exist.
    NotFound,
    /// The check could not run as configured (e.g. the password file is missing).
    Config,
}

impl Cause {
    /// Every cause, for tests and documentation.
    pub const ALL: [Cause; 23] = [
        Cause::Dns,
        Cause::Refused,
        Cause::ConnectTimeout,
        Cause::ReadTimeout,
        Cause::Reset,
        Cause::Unreachable,
        Cause::Tls,
        Cause::Auth,
        Cause::Protocol,
        Cause::ServerError,
        Cause::UnexpectedStatus,
        Cause::UnexpectedResponse,
        Cause::TooManyConnections,
        Cause::HostBlocked,
        Cause::NotReady,
        Cause::Loading,
        Cause::MasterDown,
        Cause::Busy,
        Cause::NotMaster,
        Cause::Vhost,
        Cause::Blocked,
        Cause::NotFound,
        Cause::Config,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Dns => "dns",
            Cause::Refused => "refused",
            Cause::ConnectTimeout => "connect_timeout",
            Cause::ReadTimeout => "read_timeout",
            Cause::Reset => "reset",
            Cause::Unreachable => "unreachable",
            Cause::Tls => "tls",
            Cause::Auth => "auth",
            Cause::Protocol => "protocol",
            Cause::ServerError => "server_error",
            Cause::UnexpectedStatus => "unexpected_status",
            Cause::UnexpectedResponse => "unexpected_response",
            Cause::TooManyConnections => "too_many_connections",
            Cause::HostBlocked => "host_blocked",
            Cause::NotReady => "not_ready",
            Cause::Loading => "loading",
            Cause::MasterDown => "master_down",
            Cause::Busy => "busy",
            Cause::NotMaster => "not_master",
            Cause::Vhost => "vhost",
            Cause::Blocked => "blocked",
            Cause::NotFound => "not_found",
            Cause::Config => "config",
        }
    }
}

impl Cause {
    /// How much a failure with this cause tells about the dependency (higher
    /// is more telling): the server's own answer (a refused login, a missing
    /// queue, "loading") over a broken conversation (protocol, TLS, a server
    /// error), over silence (timeouts), over a refusal, over a reset, over
    /// not reaching the host at all (typically an IPv6 address without a route).
    pub fn specificity(self) -> u8 {
        match self {
            Cause::Config
            | Cause::Auth
            | Cause::Vhost
            | Cause::NotFound
            | Cause::Blocked
            | Cause::TooManyConnections
            | Cause::HostBlocked
            | Cause::NotReady
            | Cause::Loading
            | Cause::MasterDown
            | Cause::Busy
            | Cause::NotMaster
            | Cause::UnexpectedStatus
            | Cause::UnexpectedResponse => 5,
            Cause::Protocol | Cause::ServerError | Cause::Tls => 4,
            Cause::ReadTimeout | Cause::ConnectTimeout => 3,
            Cause::Refused => 2,
            Cause::Reset => 1,
            Cause::Unreachable | Cause::Dns => 0,
        }
    }
}

/// The position of the most telling of several failures (by
/// [`Cause::specificity`]; the first among equals), `None` when there are none.
pub fn most_telling<'a>(errors: impl IntoIterator<Item = &'a CheckError>) -> Option<usize> {
    let mut best: Option<(usize, u8)> = None;
    for (i, e) in errors.into_iter().enumerate() {
        let s = e.cause.specificity();
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed check: a bounded cause and a short human message.
///
/// The message must never contain a secret; it is shown in `/status` and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cause}: {message}")]
pub struct CheckError {
    /// The classified cause (a metric label).
    pub cause: Cause,
    /// What happened, for humans (no secrets).
    pub message: String,
}

impl CheckError {
    /// Builds an error.
    pub fn new(cause: Cause, message: impl Into<String>) -> Self {
        CheckError { cause, message: message.into() }
    }
}

/// Extra facts a check reports for `/status` (e.g. the current Redis master,
/// each AMQP node's state).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Details {
    /// The server's version, when the protocol tells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// The address actually checked (e.g. the master a Sentinel named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_master: Option<String>,
    /// Per-node results, for dependencies checked as a cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
}

/// One node of a clustered dependency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    /// The node's address as configured (no credentials).
    pub address: String,
    /// Whether the node passed its last check.
    pub up: bool,
    /// The cause of its last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// The message of its last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A protocol check of one dependency.
///
/// Implementations keep whatever connection they like between calls (one
/// persistent connection is the norm), but must bound every step by
/// `deadline` and classify each failure precisely. A call may be cancelled
/// by the monitor after the deadline plus a small grace; the next call must
/// then start from a clean state.
pub trait Check: Send {
    /// Probes the dependency once; every step finishes by `deadline`.
    fn check(&mut self, deadline: Instant) -> impl Future<Output = Result<(), CheckError>> + Send;

    /// Extra facts for `/status`, read after each `check`.
    fn details(&self) -> Details {
        Details::default()
    }

    /// Ends any open connection cleanly (COM_QUIT, connection.close, ...), by `deadline`.
    fn close(&mut self, deadline: Instant) -> impl Future<Output = ()> + Send {
        let _ = deadline;
        async {}
    }

    /// The secrets this check has sent (passwords), so that a server
    /// echoing one never gets it published (see [`text::scrub`]).
    fn secrets(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Declares [`AnyCheck`], its constructor and its dispatch from one line per
/// type: `Variant(CheckType) = |settings, dependency| constructor`. The
/// variant names are those of `DependencyKind`.
macro_rules! checks {
    ($($(#[$doc:meta])* $variant:ident($check:ty) = |$s:ident, $dep:ident| $new:expr,)*) => {
        /// Any configured check (enum dispatch keeps the monitor generic-free and allocation-free).
        pub enum AnyCheck {
            $($(#[$doc])* $variant($check),)*
        }

        impl AnyCheck {
            /// Builds the check for a dependency.
            pub fn new(dep: &DependencyConfig) -> AnyCheck {
                match &dep.kind {
                    $(DependencyKind::$variant($s) => {
                        let $dep = dep;
                        let _ = $dep;
                        AnyCheck::$variant($new)
                    })*
                }
            }
        }

        macro_rules! dispatch {
            ($self_:ident, $c:ident => $e:expr) => {
                match $self_ {
                    $(AnyCheck::$variant($c) => $e,)*
                }
            };
        }
    };
}

checks! {
    /// `type: tcp`.
    Tcp(tcp::TcpCheck) = |s, _dep| tcp::TcpCheck::new(s.clone()),
    /// `type: http`.
    Http(http::HttpCheck) = |s, _dep| http::HttpCheck::new(s.clone()),
    /// `type: mysql`.
    Mysql(mysql::MysqlCheck) = |s, dep| mysql::MysqlCheck::new(s.clone(), dep),
    /// `type: postgres`.
    Postgres(postgres::PostgresCheck) = |s, dep| postgres::PostgresCheck::new(s.clone(), dep),
    /// `type: redis`.
    Redis(redis::RedisCheck) = |s, dep| redis::RedisCheck::new(s.clone(), dep),
    /// `type: amqp`.
    Amqp(amqp::AmqpCheck) = |s, dep| amqp::AmqpCheck::new(s.clone(), dep),
}

/// Every check result leaves through [`AnyCheck`], so this is where server
/// text is made fit for `/status`, metrics and logs: bounded, without
/// control characters, secrets or URL credentials.
impl Check for AnyCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        dispatch!(self, c => c.check(deadline).await).map_err(|e| {
            let secrets = self.secrets();
            CheckError { cause: e.cause, message: text::scrub(&e.message, &secrets, text::MAX_MESSAGE) }
        })
    }

    fn details(&self) -> Details {
        let d = dispatch!(self, c => c.details());
        let secrets = self.secrets();
        let detail = |s: &str| text::scrub(s, &secrets, text::MAX_DETAIL);
        Details {
            server_version: d.server_version.as_deref().map(detail),
            current_master: d.current_master.as_deref().map(detail),
            nodes: d
                .nodes
                .into_iter()
                .map(|n| NodeStatus {
                    address: detail(&n.address),
                    message: n.message.as_deref().map(|m| text::scrub(m, &secrets, text::MAX_MESSAGE)),
                    ..n
                })
                .collect(),
        }
    }

    fn secrets(&self) -> Vec<String> {
        dispatch!(self, c => c.secrets())
    }

    async fn close(&mut self, deadline: Instant) {
        dispatch!(self, c => c.close(deadline).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cause_labels_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in Cause::ALL {
            let s = c.as_str();
            assert!(s.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'), "{s}");
            assert!(seen.insert(s), "duplicate {s}");
            assert_eq!(serde_json::to_value(c).unwrap(), serde_json::Value::String(s.into()));
        }
    }

    #[test]
    fn the_most_telling_failure_is_the_servers_own_answer_then_the_first_among_equals() {
        let errs = |causes: &[Cause]| causes.iter().map(|c| CheckError::new(*c, "")).collect::<Vec<_>>();
        let pick = |causes: &[Cause]| most_telling(&errs(causes)).map(|i| causes[i]);
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&[Cause::Refused, Cause::Auth, Cause::ReadTimeout]), Some(Cause::Auth));
        assert_eq!(pick(&[Cause::Refused, Cause::Protocol]), Some(Cause::Protocol));
        assert_eq!(pick(&[Cause::Refused, Cause::ConnectTimeout]), Some(Cause::ConnectTimeout));
        assert_eq!(pick(&[Cause::Reset, Cause::Refused]), Some(Cause::Refused));
        assert_eq!(pick(&[Cause::Unreachable, Cause::Reset]), Some(Cause::Reset));
        let two_timeouts = errs(&[Cause::ConnectTimeout, Cause::ReadTimeout]);
        assert_eq!(most_telling(&two_timeouts), Some(0), "the first among equals");
    }
}
