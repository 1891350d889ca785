//! The pure judgments of the MySQL check: server error codes and library
//! errors to causes, boolean system variables, Galera node states,
//! connection saturation and when to recycle a connection. No I/O here, so
//! every rule is unit-tested with made-up values.

use std::time::Duration;

use mysql_async::{DriverError, IoError, Value};

use crate::check::io::{Phase, classify_io};
use crate::check::{Cause, CheckError};

/// The cause of a server error code.
pub fn cause_of_code(code: u16) -> Cause {
    match code {
        // Access denied: bad password (1045), no access to the database (1044),
        // no password given (1698), host not allowed (1130), client cannot do
        // the required auth method (1251).
        1044 | 1045 | 1130 | 1251 | 1698 => Cause::Auth,
        // Server-wide (1040) and per-user (1203, 1226) connection limits.
        1040 | 1203 | 1226 => Cause::TooManyConnections,
        1129 => Cause::HostBlocked,
        // 1047: "WSREP has not yet prepared node for application use";
        // 1290/1836: the statement is refused by --read-only / read-only mode;
        // 1053: server shutdown in progress.
        1047 | 1290 | 1836 | 1053 => Cause::NotReady,
        // The server aborted or killed the connection.
        1152 | 1184 | 1927 | 4031 => Cause::Reset,
        _ => Cause::ServerError,
    }
}

/// Whether a server error code means the connection itself is gone.
fn code_means_connection_lost(code: u16) -> bool {
    // 1053 shutdown, 1152/1184 aborted, 1927 killed, 4031 idle disconnect (MySQL 8).
    matches!(code, 1053 | 1152 | 1184 | 1927 | 4031)
}

/// Whether an error says the connection is gone (as opposed to the server
/// answering with an error on a working connection).
pub fn is_connection_lost(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Io(_) => true,
        mysql_async::Error::Driver(DriverError::ConnectionClosed) => true,
        mysql_async::Error::Server(s) => code_means_connection_lost(s.code),
        _ => false,
    }
}

/// Classifies a client-library error. `phase` tells whether a session was
/// already established (an I/O timeout is then a read timeout).
pub fn classify(e: &mysql_async::Error, phase: Phase, addr: &str) -> CheckError {
    match e {
        mysql_async::Error::Server(s) => CheckError::new(
            cause_of_code(s.code),
            format!("{addr}: server error {} ({}): {}", s.code, s.state, s.message),
        ),
        mysql_async::Error::Io(IoError::Io(io)) => {
            let tls = io.get_ref().is_some_and(|e| e.is::<tokio_rustls::rustls::Error>());
            let cause = match io.kind() {
                _ if tls => Cause::Tls,
                std::io::ErrorKind::InvalidData => Cause::Protocol,
                // The framed codec's "bytes remaining on stream": the peer
                // closed in the middle of a packet (e.g. of the greeting).
                // The TCP connection was made, so this is a reset, not the
                // refusal an unknown error in the connect phase defaults to.
                std::io::ErrorKind::Other => Cause::Reset,
                _ => classify_io(io, phase),
            };
            CheckError::new(cause, format!("{addr}: {io}"))
        }
        mysql_async::Error::Io(IoError::Tls(e)) => CheckError::new(Cause::Tls, format!("{addr}: {e}")),
        mysql_async::Error::Driver(d) => {
            let cause = match d {
                DriverError::ConnectionClosed => Cause::Reset,
                DriverError::UnknownAuthPlugin { .. }
                | DriverError::CleartextPluginDisabled
                | DriverError::MysqlOldPasswordDisabled => Cause::Auth,
                DriverError::NoClientSslFlagFromServer => Cause::Tls,
                _ => Cause::Protocol,
            };
            CheckError::new(cause, format!("{addr}: {d}"))
        }
        mysql_async::Error::Other(o) => CheckError::new(Cause::Protocol, format!("{addr}: {o}")),
        mysql_async::Error::Url(u) => CheckError::new(Cause::Config, format!("{addr}: {u}")),
    }
}

/// Reads a boolean system variable as the text protocol returns it
/// (`0`/`1`, or `OFF`/`ON` and the newer MariaDB `read_only` words).
pub(super) fn value_is_on(v: &Value) -> Option<bool> {
    match v {
        Value::Int(i) => Some(*i != 0),
        Value::UInt(u) => Some(*u != 0),
        Value::Bytes(b) => {
            let s = String::from_utf8_lossy(b).trim().to_ascii_uppercase();
            match s.as_str() {
                "0" | "OFF" | "FALSE" => Some(false),
                "" => None,
                // "1", "ON", and MariaDB 11's NO_LOCK / NO_LOCK_NO_ADMIN variants.
                _ => Some(true),
            }
        }
        _ => None,
    }
}

/// Why a Galera node is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GaleraError {
    /// The wsrep status variables are absent.
    #[error("wsrep status variables are missing: not a Galera node, or wsrep is off")]
    NotGalera,
    /// The node is not in the Primary component.
    #[error("wsrep_cluster_status is {0}, not Primary")]
    NotPrimary(String),
    /// The node is not Synced (or Donor, when allowed).
    #[error("wsrep_local_state is {state} ({name}), not Synced")]
    NotSynced {
        /// The state number as the server reported it.
        state: String,
        /// Its name.
        name: &'static str,
    },
}

/// Judges a Galera node from `wsrep_local_state` and `wsrep_cluster_status`
/// like Percona's clustercheck: ready when the cluster component is Primary
/// and the node is Synced (4), or Donor/Desynced (2) if `allow_donor`.
pub fn galera_verdict(
    local_state: Option<&str>,
    cluster_status: Option<&str>,
    allow_donor: bool,
) -> Result<(), GaleraError> {
    let (Some(state), Some(status)) = (local_state, cluster_status) else {
        return Err(GaleraError::NotGalera);
    };
    if !status.eq_ignore_ascii_case("Primary") {
        return Err(GaleraError::NotPrimary(status.to_string()));
    }
    let name = match state.trim() {
        "1" => "Joining",
        "2" => "Donor/Desynced",
        "3" => "Joined",
        "4" => "Synced",
        _ => "unknown",
    };
    match state.trim() {
        "4" => Ok(()),
        "2" if allow_donor => Ok(()),
        s => Err(GaleraError::NotSynced { state: s.to_string(), name }),
    }
}

/// Whether a connection must be closed after each check because the server
/// would otherwise kill it while idle between checks (`wait_timeout`).
pub fn must_recycle(wait_timeout: Duration, longest_interval: Duration) -> bool {
    // Twice the interval covers jitter, the check's own duration and a
    // monitor that runs a little late.
    longest_interval.saturating_mul(2) >= wait_timeout
}

/// Whether every ordinary connection slot is taken: with `used` connections
/// (`Threads_connected`, this session included) at `max_connections`, the
/// next login of a user without `CONNECTION ADMIN`/`SUPER` gets error 1040.
/// The one extra slot the server keeps for such an administrator does not
/// help the application, and MariaDB's `extra_port` connections (up to
/// `extra_max_connections`) are not counted in `Threads_connected`.
pub fn saturated(used: u64, max: u64) -> bool {
    max > 0 && used >= max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturated_when_connections_in_use_reach_max_connections() {
        // Our own session is among `used`: at max, the next ordinary login gets 1040.
        assert!(!saturated(9, 10));
        assert!(saturated(10, 10));
        // An administrator in the extra slot.
        assert!(saturated(11, 10));
        assert!(!saturated(5, 0), "no limit known");
    }

    #[test]
    fn error_codes_map_to_causes() {
        assert_eq!(cause_of_code(1045), Cause::Auth);
        assert_eq!(cause_of_code(1044), Cause::Auth);
        assert_eq!(cause_of_code(1698), Cause::Auth);
        assert_eq!(cause_of_code(1040), Cause::TooManyConnections);
        assert_eq!(cause_of_code(1226), Cause::TooManyConnections);
        assert_eq!(cause_of_code(1129), Cause::HostBlocked);
        assert_eq!(cause_of_code(1047), Cause::NotReady);
        assert_eq!(cause_of_code(1290), Cause::NotReady);
        assert_eq!(cause_of_code(1927), Cause::Reset);
        assert_eq!(cause_of_code(1064), Cause::ServerError);
        assert_eq!(cause_of_code(1146), Cause::ServerError);
    }

    #[test]
    fn library_errors_are_classified() {
        let server = |code| {
            mysql_async::Error::Server(mysql_async::ServerError { code, message: "m".into(), state: "HY000".into() })
        };
        assert_eq!(classify(&server(1045), Phase::Connect, "a").cause, Cause::Auth);
        let io = |k| mysql_async::Error::Io(IoError::Io(std::io::Error::new(k, "x")));
        assert_eq!(classify(&io(std::io::ErrorKind::ConnectionRefused), Phase::Connect, "a").cause, Cause::Refused);
        assert_eq!(classify(&io(std::io::ErrorKind::UnexpectedEof), Phase::Exchange, "a").cause, Cause::Reset);
        assert_eq!(classify(&io(std::io::ErrorKind::InvalidData), Phase::Exchange, "a").cause, Cause::Protocol);
        let plugin = mysql_async::Error::Driver(DriverError::UnknownAuthPlugin { name: "x".into() });
        assert_eq!(classify(&plugin, Phase::Connect, "a").cause, Cause::Auth);
        let ooo = mysql_async::Error::Driver(DriverError::PacketOutOfOrder);
        assert_eq!(classify(&ooo, Phase::Exchange, "a").cause, Cause::Protocol);
        assert!(is_connection_lost(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(is_connection_lost(&server(4031)));
        assert!(!is_connection_lost(&server(1064)));
    }

    #[test]
    fn galera_states_are_judged_like_clustercheck() {
        assert!(galera_verdict(Some("4"), Some("Primary"), false).is_ok());
        assert!(galera_verdict(Some("2"), Some("Primary"), false).is_err());
        assert!(galera_verdict(Some("2"), Some("Primary"), true).is_ok());
        assert!(galera_verdict(Some("1"), Some("Primary"), true).is_err());
        assert!(galera_verdict(Some("3"), Some("Primary"), true).is_err());
        let e = galera_verdict(Some("4"), Some("non-Primary"), false).unwrap_err().to_string();
        assert!(e.contains("non-Primary"), "{e}");
        assert!(galera_verdict(None, None, false).unwrap_err().to_string().contains("not a Galera node"));
    }

    #[test]
    fn read_only_values_are_understood() {
        assert_eq!(value_is_on(&Value::Bytes(b"0".to_vec())), Some(false));
        assert_eq!(value_is_on(&Value::Bytes(b"1".to_vec())), Some(true));
        assert_eq!(value_is_on(&Value::Bytes(b"OFF".to_vec())), Some(false));
        assert_eq!(value_is_on(&Value::Bytes(b"NO_LOCK".to_vec())), Some(true));
        assert_eq!(value_is_on(&Value::Int(0)), Some(false));
        assert_eq!(value_is_on(&Value::NULL), None);
    }

    #[test]
    fn connection_is_recycled_when_interval_nears_wait_timeout() {
        let s = Duration::from_secs;
        assert!(must_recycle(s(1), s(2)));
        assert!(must_recycle(s(4), s(2)));
        assert!(!must_recycle(s(5), s(2)));
        assert!(!must_recycle(s(28_800), s(2)));
    }
}
