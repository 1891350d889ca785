//! `host:port` addresses. Imports nothing from the crate, so any layer may use it.

use std::fmt;

/// Why a `host:port` string is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// Nothing was written.
    #[error("empty address")]
    Empty,
    /// `[` without `]`.
    #[error("unclosed '[' in IPv6 address")]
    UnclosedBracket,
    /// Text after `[v6]` that is not `:port`.
    #[error("unexpected {0:?} after IPv6 address")]
    AfterBracket(String),
    /// The port is not a number from 0 to 65535.
    #[error("invalid port {0:?}")]
    Port(String),
    /// No port and no default for this kind of address.
    #[error("{0:?} has no port; write host:port")]
    NoPort(String),
    /// `:port` without a host.
    #[error("empty host")]
    EmptyHost,
}

/// A `host:port` pair; the host is resolved at every connect, not at load.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl HostPort {
    /// Parses `host:port`, `[v6]:port`, or `host` with a default port.
    pub fn parse(s: &str, default_port: Option<u16>) -> Result<Self, HostPortError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(HostPortError::Empty);
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or(HostPortError::UnclosedBracket)?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(HostPortError::AfterBracket(after.to_string())),
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 literal has no port.
            (s, None)
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match (port, default_port) {
            (Some(p), _) => p.parse::<u16>().map_err(|_| HostPortError::Port(p.to_string()))?,
            (None, Some(d)) => d,
            (None, None) => return Err(HostPortError::NoPort(s.to_string())),
        };
        if host.is_empty() {
            return Err(HostPortError::EmptyHost);
        }
        Ok(HostPort { host: host.to_string(), port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(HostPort::parse("db:3306", None).unwrap(), HostPort { host: "db".into(), port: 3306 });
        assert_eq!(HostPort::parse("[::1]:80", None).unwrap(), HostPort { host: "::1".into(), port: 80 });
        assert_eq!(HostPort::parse("::1", Some(5)).unwrap(), HostPort { host: "::1".into(), port: 5 });
        assert_eq!(HostPort::parse("db", Some(6379)).unwrap().port, 6379);
        assert!(HostPort::parse("db", None).is_err());
        assert!(HostPort::parse("db:x", None).is_err());
        assert_eq!(HostPort::parse("[::1]:80", None).unwrap().to_string(), "[::1]:80");
    }
}
