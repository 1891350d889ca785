//! The one gate server-supplied text passes before it reaches `/status`,
//! metrics or logs.
//!
//! A check's failure message and its details quote what the server said
//! (an error reply, a close reason, a version string). A hostile or broken
//! server can say anything: megabytes, control characters, or the very
//! password the check just sent it. [`AnyCheck`](super::AnyCheck) passes
//! every message and detail of every check through [`scrub`], which
//! replaces the secrets the check knows (those it sent since it started)
//! and any credentials in a URL, removes control characters and caps the
//! length. Codecs additionally cap what they copy out of a reply
//! ([`clip`]) so that no large allocation is made for text that would be
//! cut anyway.

use std::sync::Mutex;

/// Longest failure message published (the whole message, not one quote).
pub const MAX_MESSAGE: usize = 1024;
/// Longest detail value published (a server version, a node address).
pub const MAX_DETAIL: usize = 128;
/// Longest piece of server text a codec copies into a message.
pub const MAX_QUOTE: usize = 200;
/// What a secret or URL credential is replaced with.
pub const REDACTED: &str = "***";
/// How many distinct secrets a check remembers (a rotation keeps the old
/// and the new one for a while; more than this is not a real configuration).
const MAX_SECRETS: usize = 4;

/// The secrets a check has sent to its servers, for [`scrub`].
///
/// A check records a secret when it reads it (at every connect, so a
/// rotated password is known from its first use).
#[derive(Debug, Default)]
pub struct KnownSecrets(Mutex<Vec<String>>);

impl KnownSecrets {
    /// Remembers `secret` (an empty one is never a secret).
    pub fn remember(&self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if known.iter().any(|s| s == secret) {
            return;
        }
        if known.len() == MAX_SECRETS {
            known.remove(0);
        }
        known.push(secret.to_string());
    }

    /// The secrets known so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Cuts `s` to at most `max` bytes on a char boundary, marking a cut with `…`.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

/// Lossy UTF-8 of at most `max` bytes of `b` (a cut marked with `…`),
/// without converting the rest.
pub fn clip_bytes(b: &[u8], max: usize) -> String {
    if b.len() <= max {
        return String::from_utf8_lossy(b).into_owned();
    }
    format!("{}…", String::from_utf8_lossy(&b[..max]))
}

/// Makes server text fit for publication: secrets and URL credentials
/// replaced by [`REDACTED`], control characters by `?`, at most `max`
/// bytes (plus the `…` marking a cut).
///
/// The text is cut before anything is replaced, at a point that never
/// splits an occurrence of a secret, so a cut can neither leave a partial
/// secret behind nor make the work depend on the input's length.
pub fn scrub(text: &str, secrets: &[String], max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut < text.len() {
        // Move the cut before any secret it would split.
        let longest = secrets.iter().map(String::len).max().unwrap_or(0);
        let mut window_end = (cut + longest).min(text.len());
        while !text.is_char_boundary(window_end) {
            window_end += 1;
        }
        let window = &text[..window_end];
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            for (at, _) in window.match_indices(s.as_str()) {
                if at < cut && at + s.len() > cut {
                    cut = at;
                }
            }
        }
    }
    let mut out = text[..cut].to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out = redact_url_credentials(&out);
    let mut out: String = out.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    if cut < text.len() {
        out.push('…');
    }
    out
}

/// Replaces the user-info of every `scheme://user:password@host` in `s`.
fn redact_url_credentials(s: &str) -> String {
    if !s.contains("://") {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest.find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || "\"'<>,;)".contains(c));
        let authority = &rest[..end.unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@') {
            out.push_str(REDACTED);
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn secrets_and_url_credentials_are_replaced() {
        let s = secrets(&["s3cr3t-pw"]);
        assert_eq!(scrub("-ERR invalid password s3cr3t-pw", &s, 100), "-ERR invalid password ***");
        assert_eq!(scrub("PLAIN \0app\0s3cr3t-pw refused", &s, 100), "PLAIN ?app?*** refused");
        assert_eq!(scrub("see redis://u:x@h:1/0 and amqp://a@b", &[], 100), "see redis://***@h:1/0 and amqp://***@b");
        assert_eq!(scrub("http://host/path?a=b@c", &[], 100), "http://host/path?a=b@c");
    }

    #[test]
    fn long_text_is_cut_without_leaving_part_of_a_secret() {
        let s = secrets(&["PASSWORD"]);
        let text = format!("{}PASSWORD and more", "x".repeat(95));
        let out = scrub(&text, &s, 100);
        assert!(!out.contains("PASS"), "{out}");
        assert!(out.starts_with(&"x".repeat(95)) && out.ends_with('…'), "{out}");
        let huge = "é".repeat(1_000_000);
        let out = scrub(&huge, &s, MAX_MESSAGE);
        assert!(out.len() <= MAX_MESSAGE + '…'.len_utf8(), "{}", out.len());
    }

    #[test]
    fn clipping_stops_on_a_char_boundary() {
        assert_eq!(clip("short", 10), "short");
        let c = clip(&"é".repeat(10), 5);
        assert_eq!(c, "éé…");
        assert_eq!(clip_bytes(&[b'a'; 300], 3), "aaa…");
    }

    #[test]
    fn known_secrets_are_distinct_and_bounded() {
        let k = KnownSecrets::default();
        for s in ["a", "a", "", "b", "c", "d", "e"] {
            k.remember(s);
        }
        assert_eq!(k.snapshot(), ["b", "c", "d", "e"]);
    }
}
