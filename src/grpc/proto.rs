//! A minimal protobuf writer for the few messages healthgate sends itself
//! (`google.rpc.Status` with `ErrorInfo` and `RetryInfo` details): varints,
//! length-delimited fields and nested messages, nothing else. Hand-written
//! because these three messages do not justify a code generator or `prost`
//! in the data plane; the tests pin the bytes.

use std::time::Duration;

/// Protobuf wire type of varint fields.
const VARINT: u64 = 0;
/// Protobuf wire type of length-delimited fields (strings, bytes, messages).
const LEN: u64 = 2;

/// `type_url` of `google.rpc.ErrorInfo`.
pub const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
/// `type_url` of `google.rpc.RetryInfo`.
pub const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// Appends `v` as a base-128 varint.
pub fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn tag(buf: &mut Vec<u8>, field: u32, wire: u64) {
    varint(buf, (u64::from(field) << 3) | wire);
}

/// A varint field (`int32`/`int64`; negative values as ten-byte two's
/// complement, as protobuf does). Zero is the default and is omitted.
pub fn int(buf: &mut Vec<u8>, field: u32, v: i64) {
    if v != 0 {
        tag(buf, field, VARINT);
        varint(buf, v as u64);
    }
}

/// A `bytes` (or `string`) field; empty is the default and is omitted.
pub fn bytes(buf: &mut Vec<u8>, field: u32, v: &[u8]) {
    if !v.is_empty() {
        tag(buf, field, LEN);
        varint(buf, v.len() as u64);
        buf.extend_from_slice(v);
    }
}

/// A nested message field, written even when empty (presence matters for
/// message fields).
pub fn message(buf: &mut Vec<u8>, field: u32, v: &[u8]) {
    tag(buf, field, LEN);
    varint(buf, v.len() as u64);
    buf.extend_from_slice(v);
}

/// `google.rpc.Status { int32 code = 1; string message = 2; repeated Any details = 3; }`,
/// each detail given as `(type_url, serialized message)`.
pub fn status(code: i32, msg: &str, details: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + msg.len());
    int(&mut b, 1, i64::from(code));
    bytes(&mut b, 2, msg.as_bytes());
    for (type_url, value) in details {
        // google.protobuf.Any { string type_url = 1; bytes value = 2; }
        let mut any = Vec::with_capacity(type_url.len() + value.len() + 4);
        bytes(&mut any, 1, type_url.as_bytes());
        bytes(&mut any, 2, value);
        message(&mut b, 3, &any);
    }
    b
}

/// `google.rpc.ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }`.
pub fn error_info(reason: &str, domain: &str, metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    bytes(&mut b, 1, reason.as_bytes());
    bytes(&mut b, 2, domain.as_bytes());
    for (k, v) in metadata {
        // A map entry is a message { key = 1; value = 2; }.
        let mut entry = Vec::new();
        bytes(&mut entry, 1, k.as_bytes());
        bytes(&mut entry, 2, v.as_bytes());
        message(&mut b, 3, &entry);
    }
    b
}

/// `google.rpc.RetryInfo { google.protobuf.Duration retry_delay = 1; }` with
/// `Duration { int64 seconds = 1; int32 nanos = 2; }`.
pub fn retry_info(delay: Duration) -> Vec<u8> {
    let mut d = Vec::new();
    int(&mut d, 1, i64::try_from(delay.as_secs()).unwrap_or(i64::MAX));
    int(&mut d, 2, i64::from(delay.subsec_nanos()));
    let mut b = Vec::new();
    message(&mut b, 1, &d);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let enc = |v| {
            let mut b = Vec::new();
            varint(&mut b, v);
            b
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(1), [1]);
        assert_eq!(enc(127), [0x7f]);
        assert_eq!(enc(128), [0x80, 0x01]);
        assert_eq!(enc(300), [0xac, 0x02]);
        assert_eq!(enc(500_000_000), [0x80, 0xca, 0xb5, 0xee, 0x01]);
        assert_eq!(enc(u64::MAX).len(), 10);
    }

    #[test]
    fn status_with_code_and_message_matches_known_bytes() {
        assert_eq!(status(14, "x", &[]), [0x08, 0x0e, 0x12, 0x01, b'x']);
        assert_eq!(status(0, "", &[]), [] as [u8; 0], "proto3 defaults are omitted");
    }

    #[test]
    fn retry_info_matches_known_bytes() {
        assert_eq!(retry_info(Duration::from_secs(5)), [0x0a, 0x02, 0x08, 0x05]);
        assert_eq!(
            retry_info(Duration::from_millis(1500)),
            [0x0a, 0x08, 0x08, 0x01, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01]
        );
        assert_eq!(retry_info(Duration::ZERO), [0x0a, 0x00], "an explicit zero delay");
    }

    #[test]
    fn error_info_with_metadata_matches_known_bytes() {
        let b = error_info("R", "d", &[("k", "v")]);
        assert_eq!(b, [0x0a, 0x01, b'R', 0x12, 0x01, b'd', 0x1a, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v']);
    }

    #[test]
    fn status_details_are_any_messages() {
        let b = status(14, "", &[("t", vec![0x08, 0x01])]);
        // code, then details: Any { type_url "t", value 08 01 }
        assert_eq!(b, [0x08, 0x0e, 0x1a, 0x07, 0x0a, 0x01, b't', 0x12, 0x02, 0x08, 0x01]);
    }
}
