//! I/O helpers of the checks: talking to a server by a deadline, and turning
//! a network or I/O failure into a [`Cause`].
//!
//! Resolving and connecting live in [`crate::net`]; its [`NetError`]
//! converts into a [`CheckError`], so a check writes
//! `net::connect(target, deadline).await?`.

use std::io;

use tokio::time::{Instant, timeout_at};

use super::{Cause, CheckError};
use crate::net::{NetError, NetErrorKind};

/// Which step an I/O error happened in; decides e.g. connect vs read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Establishing the TCP connection.
    Connect,
    /// Exchanging bytes on an established connection.
    Exchange,
}

impl From<NetErrorKind> for Cause {
    fn from(kind: NetErrorKind) -> Cause {
        match kind {
            NetErrorKind::Dns => Cause::Dns,
            NetErrorKind::Refused => Cause::Refused,
            NetErrorKind::ConnectTimeout => Cause::ConnectTimeout,
            NetErrorKind::Reset => Cause::Reset,
            NetErrorKind::Unreachable => Cause::Unreachable,
        }
    }
}

impl From<NetError> for CheckError {
    fn from(e: NetError) -> CheckError {
        CheckError::new(e.kind().into(), e.to_string())
    }
}

/// Classifies an I/O error.
///
/// A timeout is a connect timeout while connecting and a read timeout
/// afterwards; an error naming no network failure counts as a refusal while
/// connecting and as a reset afterwards.
pub fn classify_io(e: &io::Error, phase: Phase) -> Cause {
    // A TLS alert or record error surfaces as an I/O error on a later read
    // (TLS 1.3 reports a refused client certificate after the handshake).
    if e.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()) {
        return Cause::Tls;
    }
    match (NetErrorKind::of_io(e), phase) {
        (Some(NetErrorKind::ConnectTimeout), Phase::Exchange) => Cause::ReadTimeout,
        (Some(kind), _) => kind.into(),
        (None, Phase::Connect) => Cause::Refused,
        (None, Phase::Exchange) => Cause::Reset,
    }
}

/// Builds a [`CheckError`] from an I/O error.
pub fn io_error(e: &io::Error, phase: Phase, what: &str) -> CheckError {
    CheckError::new(classify_io(e, phase), format!("{what}: {e}"))
}

/// Runs an I/O future by `deadline`, classifying its error or timeout.
pub async fn exchange<T>(
    deadline: Instant,
    what: &str,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, CheckError> {
    match timeout_at(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(io_error(&e, Phase::Exchange, what)),
        Err(_) => Err(CheckError::new(Cause::ReadTimeout, format!("{what}: no reply in time"))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::HostPort;
    use crate::net;

    fn deadline(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn refused_port_is_classified_refused() {
        // Bind then drop to get a port that is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err: CheckError =
            net::connect(&HostPort { host: "127.0.0.1".into(), port }, deadline(1000)).await.unwrap_err().into();
        assert_eq!(err.cause, Cause::Refused, "{err}");
    }

    #[tokio::test]
    async fn unresolvable_name_is_classified_dns() {
        let err: CheckError = net::connect(&HostPort { host: "no-such-host.invalid".into(), port: 1 }, deadline(3000))
            .await
            .unwrap_err()
            .into();
        assert_eq!(err.cause, Cause::Dns, "{err}");
        assert!(err.message.contains("no-such-host.invalid"), "{err}");
    }

    #[test]
    fn every_network_failure_kind_has_its_own_cause() {
        for (kind, cause) in [
            (NetErrorKind::Dns, Cause::Dns),
            (NetErrorKind::Refused, Cause::Refused),
            (NetErrorKind::ConnectTimeout, Cause::ConnectTimeout),
            (NetErrorKind::Reset, Cause::Reset),
            (NetErrorKind::Unreachable, Cause::Unreachable),
        ] {
            assert_eq!(Cause::from(kind), cause);
            assert_eq!(kind.as_str(), cause.as_str(), "same label");
        }
    }

    #[test]
    fn io_kinds_map_to_causes() {
        let e = |k| io::Error::new(k, "x");
        assert_eq!(classify_io(&e(io::ErrorKind::ConnectionReset), Phase::Exchange), Cause::Reset);
        assert_eq!(classify_io(&e(io::ErrorKind::UnexpectedEof), Phase::Exchange), Cause::Reset);
        assert_eq!(classify_io(&e(io::ErrorKind::TimedOut), Phase::Connect), Cause::ConnectTimeout);
        assert_eq!(classify_io(&e(io::ErrorKind::TimedOut), Phase::Exchange), Cause::ReadTimeout);
        assert_eq!(classify_io(&e(io::ErrorKind::HostUnreachable), Phase::Connect), Cause::Unreachable);
        assert_eq!(classify_io(&e(io::ErrorKind::InvalidData), Phase::Connect), Cause::Refused);
        assert_eq!(classify_io(&e(io::ErrorKind::InvalidData), Phase::Exchange), Cause::Reset);
    }
}
