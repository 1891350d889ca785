//! Header rules: `Host` validation, upgrade detection, hop-by-hop removal
//! and the forwarding headers added on the way to the app and back.

use bytes::{BufMut, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{StatusCode, Version};

use super::conn::Conn;
use crate::config::HttpListenerConfig;
use crate::proxy::PROBLEM_JSON;

pub(super) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(super) static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 healthgate");
/// `Via` names the protocol received (RFC 9110 §7.6.3): an HTTP/1.0 message says so.
pub(super) static VIA_10_VALUE: HeaderValue = HeaderValue::from_static("1.0 healthgate");
/// `Via` for a message received in HTTP/2.
pub(super) static VIA_2_VALUE: HeaderValue = HeaderValue::from_static("2 healthgate");
pub(super) static CHUNKED_VALUE: HeaderValue = HeaderValue::from_static("chunked");
pub(super) static HTTP_VALUE: HeaderValue = HeaderValue::from_static("http");
pub(super) static UPGRADE_VALUE: HeaderValue = HeaderValue::from_static("upgrade");
pub(super) static CLOSE_VALUE: HeaderValue = HeaderValue::from_static("close");
pub(super) static PROBLEM_VALUE: HeaderValue = HeaderValue::from_static(PROBLEM_JSON);

/// Whether a comma-separated header list contains `token` (ASCII case-insensitive).
pub(super) fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host`, an HTTP/1.0
/// one at most; anything else is a 400. hyper passes both cases on, and
/// with two the app and a front proxy could each pick another.
pub(super) fn host_is_valid(h: &HeaderMap, version: Version) -> bool {
    let mut hosts = h.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), None) => true,
        (None, _) => version != Version::HTTP_11,
        (Some(_), Some(_)) => false,
    }
}

/// `Connection: upgrade` plus an `Upgrade` header, in an HTTP/1.1 request:
/// `Upgrade` in an HTTP/1.0 request is ignored (RFC 9110 §7.8), and so is
/// an `Upgrade` that `Connection` does not list.
pub(super) fn upgrade_requested(h: &HeaderMap, version: Version) -> bool {
    version == Version::HTTP_11
        && h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| has_token(v, "upgrade"))
}

/// The fixed hop-by-hop headers (RFC 9110 §7.6.1 and the obsolete
/// `Keep-Alive`/`Proxy-Connection`); `Proxy-Authenticate`/`-Authorization`
/// belong to this hop too. Index = bit in [`strip_hop_by_hop`]'s mask.
pub(super) fn hop_by_hop(i: usize) -> &'static HeaderName {
    match i {
        0 => &header::CONNECTION,
        1 => &KEEP_ALIVE,
        2 => &PROXY_CONNECTION,
        3 => &header::TE,
        4 => &header::TRAILER,
        5 => &header::TRANSFER_ENCODING,
        6 => &header::UPGRADE,
        7 => &header::PROXY_AUTHENTICATE,
        _ => &header::PROXY_AUTHORIZATION,
    }
}
pub(super) const HOP_BY_HOP: usize = 9;

/// The [`hop_by_hop`] index of a header name, if it is one. Dispatches on
/// the length first: most ordinary names are rejected without a compare.
#[inline]
pub(super) fn hop_index(name: &HeaderName) -> Option<usize> {
    let s = name.as_str();
    Some(match s.len() {
        2 if s == "te" => 3,
        7 if s == "trailer" => 4,
        7 if s == "upgrade" => 6,
        10 if s == "connection" => 0,
        10 if s == "keep-alive" => 1,
        16 if s == "proxy-connection" => 2,
        17 if s == "transfer-encoding" => 5,
        18 if s == "proxy-authenticate" => 7,
        19 if s == "proxy-authorization" => 8,
        _ => return None,
    })
}

/// Removes the hop-by-hop headers and the headers `Connection` names.
///
/// One pass over the names finds which are present (usually none, or just
/// `Connection`), so an ordinary message costs no hash lookup per rule. `TE`
/// goes too, `trailers` included: this hop's acceptance of trailers is not
/// the client's, and the proxy does not promise to relay them.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut present = 0u16;
    for name in h.keys() {
        if let Some(i) = hop_index(name) {
            present |= 1 << i;
        }
    }
    strip_present(h, present);
}

/// Bit of `Transfer-Encoding` in a [`strip_present`] mask.
const TRANSFER_ENCODING_BIT: u16 = 1 << 5;

/// Removes the hop-by-hop headers whose bits are set in `present` (found
/// by the caller's pass over the names), and the headers `Connection` names.
fn strip_present(h: &mut HeaderMap, present: u16) {
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Names listed in Connection: removed too. The usual tokens
        // (keep-alive, close, upgrade) need no extra allocation.
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION) {
            for t in v.as_bytes().split(|b| *b == b',') {
                let t = t.trim_ascii();
                // `Host` is end to end whatever `Connection` says: every
                // HTTP/1.1 request carries one (RFC 9112 §3.2).
                if t.is_empty()
                    || t.eq_ignore_ascii_case(b"close")
                    || t.eq_ignore_ascii_case(b"keep-alive")
                    || t.eq_ignore_ascii_case(b"host")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(t) {
                    named.push(name);
                }
            }
        }
        for name in named {
            h.remove(name);
        }
    }
    for i in 0..HOP_BY_HOP {
        if present & (1 << i) != 0 {
            h.remove(hop_by_hop(i));
        }
    }
}

/// How the transfer codings of a message stand (RFC 9112 §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Codings {
    /// `chunked` alone: the only coding healthgate decodes and re-encodes.
    Chunked,
    /// `chunked` applied more than once, which no sender may do: invalid.
    ChunkedTwice,
    /// Another coding (`gzip`, `identity`, ...): relayed under the label
    /// `chunked` its payload would be misread, so it is refused instead.
    Other,
}

/// The transfer codings of all `Transfer-Encoding` fields, in order.
pub(super) fn transfer_codings(h: &HeaderMap) -> Codings {
    let mut chunked = 0;
    for v in h.get_all(header::TRANSFER_ENCODING) {
        for t in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if t.eq_ignore_ascii_case(b"chunked") {
                chunked += 1;
            } else {
                return Codings::Other;
            }
        }
    }
    if chunked > 1 { Codings::ChunkedTwice } else { Codings::Chunked }
}

/// A response from the app that cannot be relayed as it is: answered `502`.
#[derive(Debug, thiserror::Error)]
#[error("response from the app uses a transfer coding other than chunked")]
pub struct UnsupportedCoding;

/// Request headers for the app: hop-by-hop removed, the upgrade pair
/// restored, `X-Forwarded-For`/`-Proto` and `Via` per config. `Host` is kept.
pub(super) fn prepare_request(
    h: &mut HeaderMap,
    conn: &Conn,
    cfg: &HttpListenerConfig,
    upgrade: Option<HeaderValue>,
    version: Version,
) {
    strip_hop_by_hop(h);
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, UPGRADE_VALUE.clone());
        h.insert(header::UPGRADE, u);
    }
    if cfg.x_forwarded_for {
        append_forwarded_for(h, &conn.peer);
    }
    if cfg.x_forwarded_proto {
        // Set, not appended: a client must not claim `https` through us.
        h.insert(&X_FORWARDED_PROTO, HTTP_VALUE.clone());
    }
    if cfg.via {
        h.append(header::VIA, via(version));
    }
}

/// The `Via` element for a message received with `version`.
fn via(version: Version) -> HeaderValue {
    match version {
        Version::HTTP_10 => VIA_10_VALUE.clone(),
        Version::HTTP_2 => VIA_2_VALUE.clone(),
        _ => VIA_VALUE.clone(),
    }
}

/// Encodes an app's 1xx response for the client: hop-by-hop headers and any
/// `Content-Length` removed (a 1xx has no content, RFC 9110 §8.6), `Via`
/// added with `via`.
pub(super) fn encode_informational(status: StatusCode, headers: &HeaderMap, via: bool, b: &mut Vec<u8>) {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    b.extend_from_slice(b"HTTP/1.1 ");
    b.extend_from_slice(status.as_str().as_bytes());
    b.push(b' ');
    b.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    b.extend_from_slice(b"\r\n");
    for (name, value) in h.iter().filter(|(n, _)| *n != header::CONTENT_LENGTH) {
        b.extend_from_slice(name.as_str().as_bytes());
        b.extend_from_slice(b": ");
        b.extend_from_slice(value.as_bytes());
        b.extend_from_slice(b"\r\n");
    }
    if via {
        b.extend_from_slice(b"via: 1.1 healthgate\r\n");
    }
    b.extend_from_slice(b"\r\n");
}

/// Appends the client's address to `X-Forwarded-For`, merging any existing
/// fields into one list. Without an existing header this is a refcount
/// increment (the value is built once per connection).
pub(super) fn append_forwarded_for(h: &mut HeaderMap, peer: &HeaderValue) {
    match h.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(e) => {
            e.insert(peer.clone());
        }
        header::Entry::Occupied(mut e) => {
            let mut buf = BytesMut::with_capacity(64);
            for v in e.iter() {
                buf.put_slice(v.as_bytes());
                buf.put_slice(b", ");
            }
            buf.put_slice(peer.as_bytes());
            if let Ok(v) = HeaderValue::from_maybe_shared(buf.freeze()) {
                e.insert(v);
            }
        }
    }
}

/// Response headers for the client: hop-by-hop removed, `Via` per config,
/// and the framing settled so that hyper frames the body as the app did:
/// - `Transfer-Encoding: chunked` overrides `Content-Length`, which an
///   intermediary must then remove (RFC 9112 §6.3); kept, hyper would cut
///   the body at that length;
/// - a `Content-Length` list of one repeated value (`2, 2`), which hyper
///   accepts, is sent as that one value (RFC 9110 §8.6);
/// - any other transfer coding is refused ([`UnsupportedCoding`]): the body
///   is re-framed chunked, and relayed without its codings it would be
///   misread.
///
/// One pass over the names decides all of it; an ordinary response costs no
/// extra lookup.
pub(super) fn prepare_response(h: &mut HeaderMap, via_on: bool, version: Version) -> Result<(), UnsupportedCoding> {
    let mut present = 0u16;
    let mut length = false;
    for name in h.keys() {
        if let Some(i) = hop_index(name) {
            present |= 1 << i;
        } else if name == header::CONTENT_LENGTH {
            length = true;
        }
    }
    if present & TRANSFER_ENCODING_BIT != 0 {
        if transfer_codings(h) != Codings::Chunked {
            return Err(UnsupportedCoding);
        }
        if length {
            h.remove(header::CONTENT_LENGTH);
        }
    } else if length {
        let mut all = h.get_all(header::CONTENT_LENGTH).iter();
        if let (Some(first), more) = (all.next(), all.next())
            && (more.is_some() || first.as_bytes().contains(&b','))
        {
            // A list of one repeated value (hyper checked that they agree).
            let one = first.as_bytes().split(|b| *b == b',').next().unwrap_or_default();
            if let Ok(v) = HeaderValue::from_bytes(one.trim_ascii()) {
                h.insert(header::CONTENT_LENGTH, v);
            }
        }
    }
    strip_present(h, present);
    if via_on {
        h.append(header::VIA, via(version));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("x-kept", "yes"),
            ("host", "example"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept", "host"]);
    }

    #[test]
    fn an_ordinary_message_is_left_alone() {
        let mut h = map(&[("host", "a"), ("accept", "*/*"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn hop_index_matches_exactly_the_hop_by_hop_names() {
        for i in 0..HOP_BY_HOP {
            assert_eq!(hop_index(hop_by_hop(i)), Some(i));
        }
        for other in ["host", "user-agent", "content-type", "te-x", "x-upgrade", "connectionx"] {
            assert_eq!(hop_index(&HeaderName::from_static(other)), None, "{other}");
        }
    }

    #[test]
    fn only_a_single_chunked_coding_is_relayed() {
        assert_eq!(transfer_codings(&map(&[("transfer-encoding", "Chunked")])), Codings::Chunked);
        assert_eq!(transfer_codings(&map(&[("transfer-encoding", "chunked, chunked")])), Codings::ChunkedTwice);
        let two = map(&[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")]);
        assert_eq!(transfer_codings(&two), Codings::ChunkedTwice);
        for other in ["gzip, chunked", "identity", "chunked, gzip"] {
            assert_eq!(transfer_codings(&map(&[("transfer-encoding", other)])), Codings::Other, "{other}");
        }
    }

    #[test]
    fn upgrade_needs_both_the_connection_token_and_the_header_in_http11() {
        let ws = map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert!(upgrade_requested(&ws, Version::HTTP_11));
        assert!(!upgrade_requested(&ws, Version::HTTP_10), "ignored in HTTP/1.0");
        assert!(!upgrade_requested(&map(&[("upgrade", "websocket")]), Version::HTTP_11));
        assert!(!upgrade_requested(&map(&[("connection", "upgrade")]), Version::HTTP_11));
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut h = map(&[("connection", "host, x-a"), ("host", "a"), ("x-a", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), vec!["host"]);
    }

    #[test]
    fn forwarded_for_merges_existing_fields_and_appends_the_peer() {
        let peer = HeaderValue::from_static("10.0.0.9");
        let mut h = map(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")]);
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
    }
}
