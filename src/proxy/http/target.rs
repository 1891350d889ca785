//! The request target: checked, brought to origin-form, and its path
//! normalized, before routing and admission read it. The app receives the
//! same target, so the gate and the app never read one request two ways.
//!
//! * **absolute-form** (`GET http://host/x`, RFC 9112 §3.2.2) is accepted for
//!   `http` and `https`: it is forwarded to the configured upstream (never
//!   to the host in the URI) in origin-form (`/x`), with `Host` set from the
//!   URI's authority, which a server must use instead of the received `Host`.
//!   An authority with user info is refused (RFC 9110 §4.2.4).
//! * authority-form (`CONNECT`), any other form and `Host` errors → `400`.
//! * **the path** is normalized ([`normalize`]); the query is left as received.
//!
//! The common target, an origin-form path without `%`, `//` or a segment
//! starting with `.`, is checked with one pass over its bytes and allocates
//! nothing.

use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Uri};

use super::headers::host_is_valid;

/// Why a request target is refused with `400`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadTarget {
    /// Authority-form, a scheme other than `http`/`https`, user info, or a path not starting with `/`.
    #[error("request target form not served")]
    Form,
    /// No `Host` in an HTTP/1.1 request, or more than one.
    #[error("missing or repeated Host")]
    Host,
    /// A `..` segment climbs above the root.
    #[error("path climbs above the root")]
    AboveRoot,
}

/// Checks `req`'s target and rewrites it in place to the origin-form, normalized
/// target that routing uses and the app receives (and `Host` for absolute-form).
pub(super) fn canonicalize<B>(req: &mut Request<B>) -> Result<(), BadTarget> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        return Err(BadTarget::Form);
    }
    let authority = match (uri.scheme_str(), uri.authority()) {
        (None, None) => None,
        (Some(s), Some(a)) if (s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https")) => {
            if a.as_str().contains('@') {
                return Err(BadTarget::Form);
            }
            Some(HeaderValue::from_str(a.as_str()).map_err(|_| BadTarget::Form)?)
        }
        _ => return Err(BadTarget::Form),
    };
    let path = uri.path();
    if !path.starts_with('/') {
        if path == "*" && req.method() == Method::OPTIONS && authority.is_none() {
            return host_is_valid(req.headers(), req.version()).then_some(()).ok_or(BadTarget::Host);
        }
        return Err(BadTarget::Form);
    }
    if !host_is_valid(req.headers(), req.version()) {
        return Err(BadTarget::Host);
    }
    let normalized = normalize(path)?;
    if normalized.is_some() || authority.is_some() {
        let path = normalized.as_deref().unwrap_or(path);
        let target = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        *req.uri_mut() = Uri::try_from(target).map_err(|_| BadTarget::Form)?;
    }
    if let Some(host) = authority {
        req.headers_mut().insert(header::HOST, host);
    }
    Ok(())
}

/// The normalized form of an origin-form `path` (starting with `/`), or
/// `None` when it is already normal (the common case, found without
/// allocating).
///
/// 1. `%XX` escapes of unreserved characters (RFC 3986 §2.3: letters,
///    digits, `-`, `.`, `_`, `~`) are decoded (§6.2.2.2), so `%2e%2e` is a
///    `..` segment and `/%68ealthz` is `/healthz`. Every other escape stays
///    as received: an encoded `/` (`%2F`) or `\` (`%5C`) is part of its
///    segment, never a separator (decoding it would change which resource
///    is named); a `%` without two hex digits is left as it is.
/// 2. Runs of `/` are merged into one, as nginx does by default
///    (`merge_slashes`) and as the route table already reads a path (empty
///    segments are skipped). Otherwise `/healthz//../cart` would be
///    `/healthz/cart` by RFC 3986 §5.2.4 here but `/cart` in an app that
///    merges slashes first.
/// 3. Dot-segments are removed (RFC 3986 §5.2.4): `.` goes, `..` removes the
///    segment before it; a path ending in a dot-segment keeps a final `/`.
///    A `..` with nothing left to remove climbs above the root: an error.
pub(super) fn normalize(path: &str) -> Result<Option<String>, BadTarget> {
    if !needs_normalizing(path.as_bytes()) {
        return Ok(None);
    }
    let decoded = decode_unreserved(path);
    let mut out = String::with_capacity(decoded.len());
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => match out.rfind('/') {
                Some(i) => out.truncate(i),
                None => return Err(BadTarget::AboveRoot),
            },
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Ok((out != path).then_some(out))
}

/// One pass: a `%`, a `//` or a segment starting with `.` may need work.
#[inline]
fn needs_normalizing(path: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in path {
        if b == b'%' || (prev == b'/' && (b == b'/' || b == b'.')) {
            return true;
        }
        prev = b;
    }
    false
}

/// `path` with the escapes of unreserved characters decoded.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).and_then(hex), b.get(i + 2).and_then(hex))
        {
            let c = h << 4 | l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was decoded, into ASCII: still valid UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| path.to_string())
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, BadTarget> {
        normalize(p).map(|n| n.unwrap_or_else(|| p.to_string()))
    }

    #[test]
    fn ordinary_paths_are_left_alone_without_allocating() {
        for p in ["/", "/x", "/a/b/c", "/a..b/c", "/api/v1/items-9_x~y", "/a\\..\\b"] {
            assert!(!needs_normalizing(p.as_bytes()), "{p}");
        }
        assert_eq!(normalize("/orders/1").unwrap(), None);
        assert_eq!(normalize("/.well-known/x").unwrap(), None, "a dot-file segment is not a dot-segment");
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(norm("/a/../b").unwrap(), "/b");
        assert_eq!(norm("/a/./b").unwrap(), "/a/b");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a;p=1/../b").unwrap(), "/b");
        assert_eq!(norm("/a/.../b").unwrap(), "/a/.../b");
        assert_eq!(norm("/healthz/../cart").unwrap(), "/cart");
    }

    #[test]
    fn escaped_dots_and_unreserved_characters_are_decoded_other_escapes_kept() {
        assert_eq!(norm("/healthz/%2e%2e/cart").unwrap(), "/cart");
        assert_eq!(norm("/a/%2E%2E/b").unwrap(), "/b");
        assert_eq!(norm("/a/.%2e/b").unwrap(), "/b");
        assert_eq!(norm("/%7euser/%41").unwrap(), "/~user/A");
        assert_eq!(norm("/%68ealthz").unwrap(), "/healthz");
        assert_eq!(norm("/a%2Fb").unwrap(), "/a%2Fb", "an encoded slash is not a separator");
        assert_eq!(norm("/a%2F..%2Fb").unwrap(), "/a%2F..%2Fb");
        assert_eq!(norm("/a%5c..%5cb").unwrap(), "/a%5c..%5cb");
        assert_eq!(norm("/a%252e%252e/b").unwrap(), "/a%252e%252e/b", "only one level of decoding");
        assert_eq!(norm("/a%zzb").unwrap(), "/a%zzb");
        assert_eq!(norm("/a%2").unwrap(), "/a%2");
        assert_eq!(norm("/a%00b").unwrap(), "/a%00b");
    }

    #[test]
    fn slashes_are_merged_before_dot_segments_are_removed() {
        assert_eq!(norm("//x").unwrap(), "/x");
        assert_eq!(norm("/a//b").unwrap(), "/a/b");
        assert_eq!(norm("/healthz//../cart").unwrap(), "/cart");
        assert_eq!(norm("/a/").unwrap(), "/a/");
        assert_eq!(norm("/a//").unwrap(), "/a/");
    }

    #[test]
    fn climbing_above_the_root_is_an_error() {
        for p in ["/..", "/../x", "/a/../../x", "/%2e%2e/x", "/./../x"] {
            assert_eq!(normalize(p), Err(BadTarget::AboveRoot), "{p}");
        }
        assert_eq!(norm("/a/..").unwrap(), "/");
    }

    fn target(raw: &str, host: Option<&str>) -> Result<(String, Option<String>), BadTarget> {
        let mut b = Request::builder().method(Method::GET).uri(raw);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        let mut req = b.body(()).unwrap();
        canonicalize(&mut req)?;
        let host = req.headers().get(header::HOST).map(|v| v.to_str().unwrap().to_string());
        Ok((req.uri().to_string(), host))
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_host_from_the_uri() {
        assert_eq!(target("http://a.example/x?q=1", Some("b")), Ok(("/x?q=1".into(), Some("a.example".into()))));
        assert_eq!(target("https://a.example:8443/x", Some("a")), Ok(("/x".into(), Some("a.example:8443".into()))));
        assert_eq!(target("http://a", Some("a")), Ok(("/".into(), Some("a".into()))));
        assert_eq!(target("http://a/b/../c", Some("a")), Ok(("/c".into(), Some("a".into()))));
        assert_eq!(target("ftp://a/x", Some("a")), Err(BadTarget::Form));
        assert_eq!(target("http://u@a/x", Some("a")), Err(BadTarget::Form));
    }

    #[test]
    fn origin_form_keeps_its_query_and_host() {
        assert_eq!(target("/a/../b?x=/../y", Some("h")), Ok(("/b?x=/../y".into(), Some("h".into()))));
        assert_eq!(target("/x", None), Err(BadTarget::Host));
        assert_eq!(target("/../x", Some("h")), Err(BadTarget::AboveRoot));
    }
}
