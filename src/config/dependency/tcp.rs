//! `type: tcp` settings: an address, optionally bytes to send and bytes to expect.

use super::tls::{self, TlsSettings};
use super::{DependencyType, host_port};
use crate::config::hostport::HostPort;
use crate::config::node::Map;
use crate::config::problem::Problems;

/// Why a `send`/`expect` string does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EscapeError {
    /// `\x` not followed by two hex digits.
    #[error("invalid escape \\x{0}")]
    Hex(String),
    /// A backslash followed by something else.
    #[error("invalid escape \\{0}")]
    Unknown(String),
}

/// Settings of a `tcp` dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpSettings {
    /// Where to connect.
    pub address: HostPort,
    /// Bytes to send after connecting (escapes `\r`, `\n`, `\t`, `\\`, `\xNN` allowed).
    pub send: Option<Vec<u8>>,
    /// Bytes the reply must contain.
    pub expect: Option<Vec<u8>>,
    /// With TLS, the check is a completed, verified TLS handshake.
    pub tls: Option<TlsSettings>,
}

impl DependencyType for TcpSettings {
    const NAME: &'static str = "tcp";
    const KEYS: &'static [&'static str] = &["address", "send", "expect"];

    fn parse(d: &Map<'_>, p: &mut Problems) -> Option<Self> {
        let before = p.count();
        let address = host_port(d, "address", None, p);
        let bytes = |k: &str, p: &mut Problems| {
            let s = d.str(k, p)?;
            if k == "expect" && s.value.is_empty() {
                p.at(s.pos, d.key(k), "must not be empty");
            }
            unescape(&s.value).map_err(|e| p.at(s.pos, d.key(k), e.to_string())).ok()
        };
        let send = bytes("send", p);
        let expect = bytes("expect", p);
        let tls = tls::parse(d, false, p);
        (p.count() == before).then_some(TcpSettings { address: address?, send, expect, tls })
    }
}

/// Decodes the escapes allowed in `send`/`expect`.
pub fn unescape(s: &str) -> Result<Vec<u8>, EscapeError> {
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).map_err(|_| EscapeError::Hex(hex))?);
            }
            other => return Err(EscapeError::Unknown(other.map(String::from).unwrap_or_default())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::DependencyKind;
    use super::super::testing::load;
    use super::*;

    #[test]
    fn escapes_decode() {
        assert_eq!(unescape("a\\r\\n\\x41\\\\").unwrap(), b"a\r\nA\\");
        assert!(unescape("\\q").is_err());
    }

    #[test]
    fn send_and_expect_are_decoded_and_a_bad_escape_is_reported_at_its_key() {
        let d = load("db", "    type: tcp\n    address: db:1\n    send: \"PING\\\\r\\\\n\"\n    expect: \"+PONG\"\n")
            .unwrap();
        let DependencyKind::Tcp(s) = d.kind else { panic!("{d:?}") };
        assert_eq!(s.send.as_deref(), Some(&b"PING\r\n"[..]));
        assert_eq!(s.expect.as_deref(), Some(&b"+PONG"[..]));
        let p = load("db", "    type: tcp\n    address: db:1\n    send: \"\\\\q\"\n    expect: \"\"\n").unwrap_err();
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["dependencies[0].send", "dependencies[0].expect"], "{p:?}");
    }
}
