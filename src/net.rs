//! Outbound TCP connects shared by the checks and the proxy: resolve a host
//! to every address, try each one (IPv4 and IPv6) within a deadline, and
//! say precisely why a connect failed ([`NetError`]).
//!
//! Nothing here knows about checks or requests: the checks turn a
//! [`NetError`] into their failure cause, the proxy into a `502` or a closed
//! client connection.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::config::HostPort;

/// What kind of network failure a [`NetError`] is.
///
/// When several addresses were tried, the most telling kind wins; the order
/// is [`NetErrorKind::rank`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetErrorKind {
    /// The host name did not resolve (error, timeout or no address).
    Dns,
    /// Connection refused (nothing listening).
    Refused,
    /// The connect did not complete in time (black-holed, frozen, filtered).
    ConnectTimeout,
    /// The peer reset or closed the connection.
    Reset,
    /// No route to the host or network.
    Unreachable,
}

impl NetErrorKind {
    /// The kind's label (the same words as the check failure causes).
    pub fn as_str(self) -> &'static str {
        match self {
            NetErrorKind::Dns => "dns",
            NetErrorKind::Refused => "refused",
            NetErrorKind::ConnectTimeout => "connect_timeout",
            NetErrorKind::Reset => "reset",
            NetErrorKind::Unreachable => "unreachable",
        }
    }

    /// How much a failure of this kind says about the server, lower first:
    /// a refusal or a timeout (0) beats a reset (1), which beats an
    /// unreachable address (2: typically an IPv6 address without a route)
    /// and a resolution failure (2). Of equally ranked failures the first
    /// address tried wins.
    pub fn rank(self) -> u8 {
        match self {
            NetErrorKind::Refused | NetErrorKind::ConnectTimeout => 0,
            NetErrorKind::Reset => 1,
            NetErrorKind::Unreachable | NetErrorKind::Dns => 2,
        }
    }

    /// The kind of an I/O error's [`io::ErrorKind`] (or Linux errno where the
    /// kind is not mapped), `None` when it names no network failure. A
    /// timeout is reported as [`NetErrorKind::ConnectTimeout`].
    pub fn of_io(e: &io::Error) -> Option<NetErrorKind> {
        use io::ErrorKind::*;
        Some(match e.kind() {
            ConnectionRefused => NetErrorKind::Refused,
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected => NetErrorKind::Reset,
            TimedOut | WouldBlock => NetErrorKind::ConnectTimeout,
            HostUnreachable | NetworkUnreachable | AddrNotAvailable | NetworkDown => NetErrorKind::Unreachable,
            _ => match e.raw_os_error() {
                Some(EHOSTUNREACH | ENETUNREACH) => NetErrorKind::Unreachable,
                _ => return None,
            },
        })
    }

    /// The kind of a failed connect: [`NetErrorKind::of_io`], and a refusal
    /// for anything it does not name.
    pub fn of_connect(e: &io::Error) -> NetErrorKind {
        NetErrorKind::of_io(e).unwrap_or(NetErrorKind::Refused)
    }
}

/// Linux `EHOSTUNREACH`, for platforms where std does not map the kind.
const EHOSTUNREACH: i32 = 113;
/// Linux `ENETUNREACH`, likewise.
const ENETUNREACH: i32 = 101;

impl fmt::Display for NetErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed connect attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The address tried.
    pub addr: SocketAddr,
    /// Why it failed.
    pub kind: NetErrorKind,
    /// The failure in words.
    pub detail: String,
}

/// Resolving or connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The resolver did not answer by the deadline.
    #[error("resolving {host} timed out")]
    ResolveTimeout {
        /// The host name.
        host: String,
    },
    /// The resolver failed.
    #[error("cannot resolve {host}: {error}")]
    ResolveFailed {
        /// The host name.
        host: String,
        /// The resolver's error.
        error: io::Error,
    },
    /// The name resolved to no address.
    #[error("{host} has no addresses")]
    NoAddresses {
        /// The host name.
        host: String,
    },
    /// Every address was tried and none accepted.
    #[error("connect failed: {}", Attempts(attempts))]
    Connect {
        /// Every attempt, in the order made.
        attempts: Vec<Attempt>,
    },
}

impl NetError {
    /// The kind: [`NetErrorKind::Dns`] for a resolution failure, else the
    /// most telling attempt's (see [`NetErrorKind::rank`]).
    pub fn kind(&self) -> NetErrorKind {
        match self {
            NetError::ResolveTimeout { .. } | NetError::ResolveFailed { .. } | NetError::NoAddresses { .. } => {
                NetErrorKind::Dns
            }
            NetError::Connect { .. } => self.telling().map_or(NetErrorKind::Dns, |a| a.kind),
        }
    }

    /// The address whose failure gives [`NetError::kind`] (none when the
    /// name did not resolve).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.telling().map(|a| a.addr)
    }

    fn telling(&self) -> Option<&Attempt> {
        match self {
            NetError::Connect { attempts } => attempts.iter().min_by_key(|a| a.kind.rank()),
            _ => None,
        }
    }
}

/// Displays attempts as `addr: kind (detail); ...`.
struct Attempts<'a>(&'a [Attempt]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {} ({})", a.addr, a.kind, a.detail)?;
        }
        Ok(())
    }
}

/// The time left until `deadline` (zero when past).
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Resolves `host:port` to every address (A and AAAA), by `deadline`.
///
/// Resolution happens at every call: Kubernetes Service IPs and pod IPs change.
pub async fn resolve(target: &HostPort, deadline: Instant) -> Result<Vec<SocketAddr>, NetError> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    let host = || target.host.clone();
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    match timeout_at(deadline, lookup).await {
        Err(_) => Err(NetError::ResolveTimeout { host: host() }),
        Ok(Err(error)) => Err(NetError::ResolveFailed { host: host(), error }),
        Ok(Ok(addrs)) => {
            let mut addrs: Vec<SocketAddr> = addrs.collect();
            addrs.dedup();
            if addrs.is_empty() { Err(NetError::NoAddresses { host: host() }) } else { Ok(addrs) }
        }
    }
}

/// Connects to the first address of `target` that accepts, trying every
/// resolved address in turn; each attempt gets an equal share of the time
/// left, so one black-holed address cannot eat the whole budget.
///
/// On failure the error names each address tried; its kind is the most
/// telling attempt's ([`NetErrorKind::rank`]).
pub async fn connect(target: &HostPort, deadline: Instant) -> Result<(TcpStream, SocketAddr), NetError> {
    let addrs = resolve(target, deadline).await?;
    connect_addrs(&addrs, deadline).await
}

/// Like [`connect`] for already resolved addresses.
pub async fn connect_addrs(addrs: &[SocketAddr], deadline: Instant) -> Result<(TcpStream, SocketAddr), NetError> {
    let mut attempts: Vec<Attempt> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let left = addrs.len() - i;
        let share = remaining(deadline) / left as u32;
        let failed = |kind, detail| Attempt { addr: *addr, kind, detail };
        if share.is_zero() {
            attempts.push(failed(NetErrorKind::ConnectTimeout, "no time left".into()));
            continue;
        }
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, *addr));
            }
            Ok(Err(e)) => attempts.push(failed(NetErrorKind::of_connect(&e), e.to_string())),
            Err(_) => attempts.push(failed(NetErrorKind::ConnectTimeout, format!("no answer within {share:?}"))),
        }
    }
    Err(NetError::Connect { attempts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    fn attempt(port: u16, kind: NetErrorKind) -> Attempt {
        Attempt { addr: SocketAddr::from(([127, 0, 0, 1], port)), kind, detail: "x".into() }
    }

    #[tokio::test]
    async fn refused_port_is_classified_refused() {
        // Bind then drop to get a port that is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = connect(&HostPort { host: "127.0.0.1".into(), port }, deadline(1000)).await.unwrap_err();
        assert_eq!(err.kind(), NetErrorKind::Refused, "{err}");
        assert_eq!(err.addr().map(|a| a.port()), Some(port), "{err}");
    }

    #[tokio::test]
    async fn unresolvable_name_is_classified_dns() {
        let err =
            connect(&HostPort { host: "no-such-host.invalid".into(), port: 1 }, deadline(3000)).await.unwrap_err();
        assert_eq!(err.kind(), NetErrorKind::Dns, "{err}");
        assert_eq!(err.addr(), None);
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
    fn the_most_telling_attempt_gives_the_kind_and_the_address() {
        use NetErrorKind::*;
        let e = NetError::Connect { attempts: vec![attempt(1, Unreachable), attempt(2, Reset), attempt(3, Refused)] };
        assert_eq!((e.kind(), e.addr().map(|a| a.port())), (Refused, Some(3)));
        let e = NetError::Connect { attempts: vec![attempt(1, ConnectTimeout), attempt(2, Refused)] };
        assert_eq!((e.kind(), e.addr().map(|a| a.port())), (ConnectTimeout, Some(1)), "first of equal rank");
        let e = NetError::Connect { attempts: vec![attempt(1, Unreachable), attempt(2, Reset)] };
        assert_eq!(e.kind(), Reset);
        assert_eq!(NetError::Connect { attempts: vec![] }.kind(), Dns, "no address to try");
    }

    #[test]
    fn a_failed_connect_names_every_attempt() {
        let e = NetError::Connect {
            attempts: vec![attempt(1, NetErrorKind::Unreachable), attempt(2, NetErrorKind::Refused)],
        };
        assert_eq!(e.to_string(), "connect failed: 127.0.0.1:1: unreachable (x); 127.0.0.1:2: refused (x)");
    }

    #[test]
    fn io_kinds_map_to_network_failures() {
        let e = |k| io::Error::new(k, "x");
        assert_eq!(NetErrorKind::of_connect(&e(io::ErrorKind::ConnectionRefused)), NetErrorKind::Refused);
        assert_eq!(NetErrorKind::of_connect(&e(io::ErrorKind::ConnectionReset)), NetErrorKind::Reset);
        assert_eq!(NetErrorKind::of_connect(&e(io::ErrorKind::TimedOut)), NetErrorKind::ConnectTimeout);
        assert_eq!(NetErrorKind::of_connect(&e(io::ErrorKind::HostUnreachable)), NetErrorKind::Unreachable);
        assert_eq!(NetErrorKind::of_connect(&io::Error::from_raw_os_error(ENETUNREACH)), NetErrorKind::Unreachable);
        assert_eq!(NetErrorKind::of_io(&e(io::ErrorKind::InvalidData)), None);
        assert_eq!(NetErrorKind::of_connect(&e(io::ErrorKind::InvalidData)), NetErrorKind::Refused);
    }
}
