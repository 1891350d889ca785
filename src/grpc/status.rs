//! gRPC statuses healthgate answers itself: the trailers-only response
//! (`grpc-status`, percent-encoded `grpc-message`, and
//! `grpc-status-details-bin` carrying a `google.rpc.Status` with an
//! `ErrorInfo` and a `RetryInfo`), the gRPC counterpart of the
//! problem+json short-circuit body.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use super::proto;

/// `grpc-status`.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-status-details-bin`.
pub static GRPC_STATUS_DETAILS_BIN: HeaderName = HeaderName::from_static("grpc-status-details-bin");
/// `application/grpc`, the content type of every local answer.
pub static GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
/// `ErrorInfo.domain` of every local answer.
pub const DOMAIN: &str = "healthgate";

/// gRPC status codes, by their canonical names (`OK` excluded: a local
/// answer is always an error). Index = code.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// `DEADLINE_EXCEEDED`: the app did not answer in time.
pub const DEADLINE_EXCEEDED: u8 = 4;
/// `UNIMPLEMENTED`: the listener cannot carry gRPC to its app.
pub const UNIMPLEMENTED: u8 = 12;
/// `INTERNAL`: the request was malformed or the app's answer broken.
pub const INTERNAL: u8 = 13;
/// `UNAVAILABLE`: try again later (the default for both impacts).
pub const UNAVAILABLE: u8 = 14;
/// `RESOURCE_EXHAUSTED`: a request over a limit.
pub const RESOURCE_EXHAUSTED: u8 = 8;

/// Whether a `content-type` is gRPC's: `application/grpc`, alone or with a
/// `+codec` suffix or parameters. `application/grpc-web*` is not (gRPC-Web
/// carries trailers in the body, which these answers do not).
pub fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    let Some(v) = content_type else { return false };
    let b = v.as_bytes();
    let prefix = b"application/grpc";
    b.len() >= prefix.len()
        && b[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(b.get(prefix.len()), None | Some(b'+' | b';' | b' '))
}

/// `grpc-message` encoding: bytes 0x20–0x7E except `%` as they are, every
/// other byte (UTF-8 included) as `%XX`.
pub fn percent_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Standard base64 without padding (gRPC accepts both for `-bin` headers).
pub fn base64_unpadded(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// What a local gRPC answer says.
#[derive(Debug, Clone)]
pub struct LocalStatus<'a> {
    /// The gRPC status code (never 0).
    pub code: u8,
    /// `grpc-message` and `Status.message` (sent percent-encoded).
    pub message: &'a str,
    /// `ErrorInfo.reason` (`None`: no details at all).
    pub reason: Option<&'a str>,
    /// Dependency names for `ErrorInfo.metadata["dependencies"]` (comma
    /// separated; empty unless the operator exposes them).
    pub dependencies: &'a str,
    /// `RetryInfo.retry_delay` (`None`: no `RetryInfo`).
    pub retry_after: Option<Duration>,
}

impl LocalStatus<'_> {
    /// The headers of the trailers-only response (`:status 200` is the
    /// caller's): `content-type`, `grpc-status`, `grpc-message` and, with a
    /// reason, `grpc-status-details-bin`.
    pub fn headers(&self, h: &mut HeaderMap) {
        h.insert(hyper::header::CONTENT_TYPE, GRPC_CONTENT_TYPE.clone());
        h.insert(&GRPC_STATUS, HeaderValue::from(u16::from(self.code)));
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(percent_encode(self.message))) {
            h.insert(&GRPC_MESSAGE, v);
        }
        if let Some(reason) = self.reason {
            let meta: &[(&str, &str)] =
                if self.dependencies.is_empty() { &[] } else { &[("dependencies", self.dependencies)] };
            let mut details = vec![(proto::ERROR_INFO_TYPE, proto::error_info(reason, DOMAIN, meta))];
            if let Some(d) = self.retry_after {
                details.push((proto::RETRY_INFO_TYPE, proto::retry_info(d)));
            }
            let status = proto::status(i32::from(self.code), self.message, &details);
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(base64_unpadded(&status))) {
                h.insert(&GRPC_STATUS_DETAILS_BIN, v);
            }
        }
    }
}

/// The bounded label value of a status code.
pub fn code_label(code: u8) -> &'static str {
    const LABELS: [&str; 17] =
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
    LABELS.get(usize::from(code)).copied().unwrap_or("2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_grpc_content_types_are_grpc() {
        let v = |s: &'static str| Some(HeaderValue::from_static(s));
        assert!(is_grpc(v("application/grpc").as_ref()));
        assert!(is_grpc(v("application/grpc+proto").as_ref()));
        assert!(is_grpc(v("Application/GRPC;charset=x").as_ref()));
        assert!(!is_grpc(v("application/grpc-web").as_ref()), "gRPC-Web is not served natively");
        assert!(!is_grpc(v("application/json").as_ref()));
        assert!(!is_grpc(None));
    }

    #[test]
    fn grpc_message_is_percent_encoded_as_grpc_requires() {
        assert_eq!(percent_encode("OUT OF SERVICE"), "OUT OF SERVICE");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("a\nb"), "a%0Ab");
        assert_eq!(percent_encode("né"), "n%C3%A9");
    }

    #[test]
    fn base64_matches_rfc_4648_vectors_without_padding() {
        for (input, out) in
            [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("fooba", "Zm9vYmE")]
        {
            assert_eq!(base64_unpadded(input.as_bytes()), out);
        }
        assert_eq!(base64_unpadded(&[0xff, 0xfe]), "//4");
    }

    /// The bytes Python's `google.rpc.status_pb2` produces for the same
    /// `Status` (ErrorInfo packed first, then RetryInfo).
    const PYTHON_STATUS_HEX: &str = "080e120e4f5554204f4620534552564943451a640a28747970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e4572726f72496e666f12380a16444550454e44454e43595f554e415641494c41424c45120a6865616c7468676174651a120a0c646570656e64656e63696573120264621a300a28747970652e676f6f676c65617069732e636f6d2f676f6f676c652e7270632e5265747279496e666f12040a020805";

    #[test]
    fn details_header_carries_the_status_protobuf_generates() {
        let s = LocalStatus {
            code: UNAVAILABLE,
            message: "OUT OF SERVICE",
            reason: Some("DEPENDENCY_UNAVAILABLE"),
            dependencies: "db",
            retry_after: Some(Duration::from_secs(5)),
        };
        let mut h = HeaderMap::new();
        s.headers(&mut h);
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "OUT OF SERVICE");
        let want: Vec<u8> = (0..PYTHON_STATUS_HEX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&PYTHON_STATUS_HEX[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(h["grpc-status-details-bin"].to_str().unwrap(), base64_unpadded(&want));
    }

    #[test]
    fn without_a_reason_there_are_no_details() {
        let s =
            LocalStatus { code: DEADLINE_EXCEEDED, message: "x", reason: None, dependencies: "", retry_after: None };
        let mut h = HeaderMap::new();
        s.headers(&mut h);
        assert_eq!(h["grpc-status"], "4");
        assert!(!h.contains_key("grpc-status-details-bin"));
        assert_eq!(code_label(14), "14");
    }
}
