//! `type: http` settings: a URL, the statuses that count as healthy and an
//! optional body substring.

use hyper::Uri;

use super::DependencyType;
use super::tls::{self, TlsSettings};
use crate::config::hostport::HostPort;
use crate::config::node::Map;
use crate::config::problem::Problems;

/// Port of `http://` URLs without one.
pub const DEFAULT_HTTP_PORT: u16 = 80;
/// Port of `https://` URLs without one.
pub const DEFAULT_HTTPS_PORT: u16 = 443;
/// The status codes HTTP defines (`expect_status` must be among them).
const STATUS_RANGE: std::ops::RangeInclusive<u16> = 100..=599;

/// Settings of an `http` dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Where to connect.
    pub address: HostPort,
    /// Path and query to GET.
    pub path_and_query: String,
    /// `Host` header value.
    pub host_header: String,
    /// Statuses that count as healthy (default: any 2xx).
    pub expect_status: Vec<u16>,
    /// A substring the body must contain.
    pub expect_body: Option<String>,
    /// TLS (`https://`), verified.
    pub tls: Option<TlsSettings>,
}

impl DependencyType for HttpSettings {
    const NAME: &'static str = "http";
    const KEYS: &'static [&'static str] = &["url", "expect_status", "expect_body", "host_header"];

    fn parse(d: &Map<'_>, p: &mut Problems) -> Option<Self> {
        let before = p.count();
        let mut expect_status = Vec::new();
        if let Some(list) = d.get("expect_status") {
            let key = d.key("expect_status");
            let codes = list.seq(&key, p).unwrap_or_default();
            for code in codes {
                let Some(code) = code.int::<u16>(&key, p) else { continue };
                if !STATUS_RANGE.contains(&code.value) {
                    p.at(list.pos, &*key, format!("{} is not an HTTP status", code.value));
                }
                expect_status.push(code.value);
            }
            if codes.is_empty() {
                p.at(list.pos, key, "must list at least one status");
            }
        }
        let expect_body = d.str("expect_body", p).map(|b| b.value);
        let host_header = d.str("host_header", p).map(|h| h.value);
        let url = d.required_str("url", p)?;
        let uri: Uri = match url.value.parse() {
            Ok(u) => u,
            Err(e) => {
                p.at(url.pos, d.key("url"), format!("invalid URL: {e}"));
                return None;
            }
        };
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                p.at(url.pos, d.key("url"), "must be an absolute http:// or https:// URL");
                return None;
            }
        };
        let Some(authority) = uri.authority() else {
            p.at(url.pos, d.key("url"), "must include a host");
            return None;
        };
        if authority.as_str().contains('@') {
            // It would be sent as the Host header, logged and shown in /status.
            p.at(url.pos, d.key("url"), "credentials in the URL are not allowed");
            return None;
        }
        let address = HostPort {
            host: authority.host().trim_start_matches('[').trim_end_matches(']').to_string(),
            port: authority.port_u16().unwrap_or(if https { DEFAULT_HTTPS_PORT } else { DEFAULT_HTTP_PORT }),
        };
        let tls = tls::parse(d, https, p);
        (p.count() == before).then(|| HttpSettings {
            address,
            path_and_query: uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()),
            host_header: host_header.unwrap_or_else(|| authority.as_str().to_string()),
            expect_status,
            expect_body,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::DependencyKind;
    use super::super::testing::load;

    #[test]
    fn url_gives_address_path_and_host_header_and_https_turns_tls_on() {
        let d = load("api", "    type: http\n    url: https://api.local/health?x=1\n    expect_status: [200, 204]\n")
            .unwrap();
        let DependencyKind::Http(s) = d.kind else { panic!("{d:?}") };
        assert_eq!((s.address.host.as_str(), s.address.port), ("api.local", 443));
        assert_eq!((s.path_and_query.as_str(), s.host_header.as_str()), ("/health?x=1", "api.local"));
        assert_eq!(s.expect_status, [200, 204]);
        assert!(s.tls.is_some());
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echoing_them() {
        let p = load("api", "    type: http\n    url: http://user:Pw-In-Url@api.local/health\n").unwrap_err();
        let text = format!("{p:?}");
        assert!(text.contains("dependencies[0].url") && text.contains("credentials"), "{text}");
        assert!(!text.contains("Pw-In-Url"), "{text}");
    }

    #[test]
    fn a_relative_url_and_a_status_out_of_range_are_reported() {
        let p = load("api", "    type: http\n    url: /health\n    expect_status: [200, 700]\n").unwrap_err();
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["dependencies[0].url", "dependencies[0].expect_status"], "{p:?}");
    }
}
