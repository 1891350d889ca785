//! Network helpers shared by the checks: resolve a host to every address,
//! try each one (IPv4 and IPv6) within the deadline, and classify I/O errors
//! into a [`Cause`].

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::{Cause, CheckError};
use crate::config::HostPort;

/// Which step an I/O error happened in; decides e.g. connect vs read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Establishing the TCP connection.
    Connect,
    /// Exchanging bytes on an established connection.
    Exchange,
}

/// Classifies an I/O error.
pub fn classify_io(e: &io::Error, phase: Phase) -> Cause {
    use io::ErrorKind::*;
    // A TLS alert or record error surfaces as an I/O error on a later read
    // (TLS 1.3 reports a refused client certificate after the handshake).
    if e.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()) {
        return Cause::Tls;
    }
    match e.kind() {
        ConnectionRefused => Cause::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected => Cause::Reset,
        TimedOut | WouldBlock => match phase {
            Phase::Connect => Cause::ConnectTimeout,
            Phase::Exchange => Cause::ReadTimeout,
        },
        HostUnreachable | NetworkUnreachable | AddrNotAvailable | NetworkDown => Cause::Unreachable,
        _ => match e.raw_os_error() {
            // EHOSTUNREACH / ENETUNREACH on platforms where the kind is not mapped.
            Some(113) | Some(101) => Cause::Unreachable,
            _ => match phase {
                Phase::Connect => Cause::Refused,
                Phase::Exchange => Cause::Reset,
            },
        },
    }
}

/// Builds a [`CheckError`] from an I/O error.
pub fn io_error(e: &io::Error, phase: Phase, what: &str) -> CheckError {
    CheckError::new(classify_io(e, phase), format!("{what}: {e}"))
}

/// The time left until `deadline` (zero when past).
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Resolves `host:port` to every address (A and AAAA), by `deadline`.
///
/// Resolution happens at every call: Kubernetes Service IPs and pod IPs change.
pub async fn resolve(target: &HostPort, deadline: Instant) -> Result<Vec<SocketAddr>, CheckError> {
    if let Ok(ip) = target.host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    match timeout_at(deadline, lookup).await {
        Err(_) => Err(CheckError::new(Cause::Dns, format!("resolving {} timed out", target.host))),
        Ok(Err(e)) => Err(CheckError::new(Cause::Dns, format!("cannot resolve {}: {e}", target.host))),
        Ok(Ok(addrs)) => {
            let mut addrs: Vec<SocketAddr> = addrs.collect();
            addrs.dedup();
            if addrs.is_empty() {
                Err(CheckError::new(Cause::Dns, format!("{} has no addresses", target.host)))
            } else {
                Ok(addrs)
            }
        }
    }
}

/// Connects to the first address of `target` that accepts, trying every
/// resolved address in turn; each attempt gets an equal share of the time
/// left, so one black-holed address cannot eat the whole budget.
///
/// On failure the error of the most telling attempt is returned (a refusal or
/// timeout beats an unreachable family), naming each address tried.
pub async fn connect(target: &HostPort, deadline: Instant) -> Result<(TcpStream, SocketAddr), CheckError> {
    let addrs = resolve(target, deadline).await?;
    connect_addrs(&addrs, deadline).await
}

/// Like [`connect`] for already resolved addresses.
pub async fn connect_addrs(addrs: &[SocketAddr], deadline: Instant) -> Result<(TcpStream, SocketAddr), CheckError> {
    let mut failures: Vec<(SocketAddr, Cause, String)> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let left = addrs.len() - i;
        let share = remaining(deadline) / left as u32;
        if share.is_zero() {
            failures.push((*addr, Cause::ConnectTimeout, "no time left".into()));
            continue;
        }
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, *addr));
            }
            Ok(Err(e)) => failures.push((*addr, classify_io(&e, Phase::Connect), e.to_string())),
            Err(_) => failures.push((*addr, Cause::ConnectTimeout, format!("no answer within {share:?}"))),
        }
    }
    // Prefer the cause that says most about the server: a refusal or a
    // timeout over "unreachable" (typically an IPv6 address without a route).
    let rank = |c: Cause| match c {
        Cause::Refused | Cause::ConnectTimeout => 0,
        Cause::Reset => 1,
        _ => 2,
    };
    let cause = failures.iter().map(|f| f.1).min_by_key(|c| rank(*c)).unwrap_or(Cause::Dns);
    let message = failures.iter().map(|(a, c, m)| format!("{a}: {c} ({m})")).collect::<Vec<_>>().join("; ");
    Err(CheckError::new(cause, format!("connect failed: {message}")))
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
    use super::*;

    fn deadline(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn refused_port_is_classified_refused() {
        // Bind then drop to get a port that is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = connect(&HostPort { host: "127.0.0.1".into(), port }, deadline(1000)).await.unwrap_err();
        assert_eq!(err.cause, Cause::Refused, "{err}");
    }

    #[tokio::test]
    async fn unresolvable_name_is_classified_dns() {
        let err =
            connect(&HostPort { host: "no-such-host.invalid".into(), port: 1 }, deadline(3000)).await.unwrap_err();
        assert_eq!(err.cause, Cause::Dns, "{err}");
    }

    #[tokio::test]
    async fn every_address_is_tried_until_one_accepts() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let (_, used) = connect_addrs(&[dead, live_addr], deadline(1000)).await.unwrap();
        assert_eq!(used, live_addr);
    }

    #[test]
    fn io_kinds_map_to_causes() {
        let e = |k| io::Error::new(k, "x");
        assert_eq!(classify_io(&e(io::ErrorKind::ConnectionReset), Phase::Exchange), Cause::Reset);
        assert_eq!(classify_io(&e(io::ErrorKind::UnexpectedEof), Phase::Exchange), Cause::Reset);
        assert_eq!(classify_io(&e(io::ErrorKind::TimedOut), Phase::Connect), Cause::ConnectTimeout);
        assert_eq!(classify_io(&e(io::ErrorKind::TimedOut), Phase::Exchange), Cause::ReadTimeout);
        assert_eq!(classify_io(&e(io::ErrorKind::HostUnreachable), Phase::Connect), Cause::Unreachable);
    }
}
