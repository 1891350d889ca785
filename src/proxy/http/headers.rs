//! Header rules: `Host` validation, upgrade detection, hop-by-hop removal
//! and the forwarding headers added on the way to the app and back.

use bytes::{BufMut, BytesMut};
use hyper::Version;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Worker;
use super::conn::Conn;
use crate::proxy::PROBLEM_JSON;

pub(super) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(super) static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 healthgate");
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

/// Request headers for the app: hop-by-hop removed, the upgrade pair
/// restored, `X-Forwarded-For`/`-Proto` and `Via` per config. `Host` is kept.
pub(super) fn prepare_request(h: &mut HeaderMap, conn: &Conn, upgrade: Option<HeaderValue>) {
    let cfg = &conn.worker.ctx.config.http;
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
        h.append(header::VIA, VIA_VALUE.clone());
    }
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

/// Response headers for the client: hop-by-hop removed, `Via` per config.
pub(super) fn prepare_response(h: &mut HeaderMap, w: &Worker) {
    strip_hop_by_hop(h);
    if w.ctx.config.http.via {
        h.append(header::VIA, VIA_VALUE.clone());
    }
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
