//! `type: amqp` (alias `rabbitmq`) settings: the broker nodes, how many must
//! pass, the queues that must exist and the heartbeat.

use std::collections::HashSet;

use super::tls::{self, TlsSettings};
use super::{DependencyType, parse_host_port, secret_source};
use crate::config::hostport::{HostPort, HostPortError};
use crate::config::node::Map;
use crate::config::problem::{At, Problems};
use crate::config::secret::SecretSource;

/// Default AMQP port.
pub const DEFAULT_PORT: u16 = 5672;
/// Default AMQPS port.
pub const DEFAULT_TLS_PORT: u16 = 5671;
/// The user (and password) an AMQP URL without a user logs in as.
pub const DEFAULT_USER: &str = "guest";
/// Longest queue or virtual host name AMQP can carry (a short string).
const MAX_NAME: usize = 255;

/// Why an AMQP URL does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not `amqp://` or `amqps://`.
    #[error("must be an amqp:// or amqps:// URL (amqp://user@host:5672/vhost)")]
    Scheme,
    /// `?` or `#` in the URL.
    #[error("query parameters are not supported; use the dependency's keys (e.g. `heartbeat`)")]
    Query,
    /// `user:password@`.
    #[error("a password in the URL is not allowed (it would be logged and shown); use password_env or password_file")]
    Password,
    /// `@` with nothing before it.
    #[error("empty user name")]
    EmptyUser,
    /// No host.
    #[error("the URL has no host")]
    NoHost,
    /// The vhost has a `/`.
    #[error("the vhost must be one path segment (encode '/' as %2f)")]
    VhostSegments,
    /// The vhost is too long.
    #[error("the vhost name is longer than 255 bytes")]
    VhostLength,
    /// A `%` escape is cut short.
    #[error("truncated %-escape")]
    TruncatedEscape,
    /// A `%` escape is not hex.
    #[error("invalid %-escape %{0}")]
    InvalidEscape(String),
    /// The decoded bytes are not UTF-8.
    #[error("%-escapes do not decode to UTF-8")]
    NotUtf8,
    /// The host and port do not parse.
    #[error(transparent)]
    HostPort(#[from] HostPortError),
}

/// How many nodes must pass for the dependency to be up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Require {
    /// At least one node (the default: clients can use any node).
    Any,
    /// More than half of the nodes.
    Quorum,
    /// Every node.
    All,
}

impl Require {
    /// Every choice, as written in the config.
    const CHOICES: &[(&str, Require)] = &[("any", Require::Any), ("quorum", Require::Quorum), ("all", Require::All)];

    /// The keyword as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Require::Any => "any",
            Require::Quorum => "quorum",
            Require::All => "all",
        }
    }

    /// How many of `total` nodes must be up.
    pub fn needed(self, total: usize) -> usize {
        match self {
            Require::Any => 1.min(total),
            Require::Quorum => total / 2 + 1,
            Require::All => total,
        }
    }
}

/// One broker node to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpNode {
    /// Where to connect.
    pub address: HostPort,
    /// Login user.
    pub user: String,
    /// Virtual host (decoded; `/` by default).
    pub vhost: String,
}

/// Settings of an `amqp` dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpSettings {
    /// The nodes, from `url`, `urls` or `url` + `nodes`.
    pub nodes: Vec<AmqpNode>,
    /// Where the password comes from (`None`: the URI default `guest`, only valid for user `guest`).
    pub password: Option<SecretSource>,
    /// How many nodes must pass.
    pub require: Require,
    /// Queues that must exist (passive `queue.declare`).
    pub queues: Vec<String>,
    /// Heartbeat to negotiate, whole seconds (`None`: derived from the check schedule; 0 disables).
    pub heartbeat: Option<u16>,
    /// TLS for every node (`amqps://` or `tls: true`).
    pub tls: Option<TlsSettings>,
}

impl DependencyType for AmqpSettings {
    const NAME: &'static str = "amqp";
    const ALIASES: &'static [&'static str] = &["rabbitmq"];
    const KEYS: &'static [&'static str] =
        &["url", "urls", "nodes", "require", "password_env", "password_file", "queues", "heartbeat"];

    fn parse(d: &Map<'_>, p: &mut Problems) -> Option<Self> {
        let before = p.count();
        let url = d.str("url", p);
        let urls = d.str_list("urls", p);
        let list = d.str_list("nodes", p);
        let nodes = nodes(d, url.as_ref(), urls.as_ref(), list.as_ref(), p);

        let password = secret_source(d, p);
        if password.is_none() && nodes.iter().any(|n| n.user != DEFAULT_USER) {
            p.at(
                d.pos,
                d.key("password_env"),
                "set password_env or password_file (only user guest defaults to password guest)",
            );
        }
        let require = d.choice("require", Require::CHOICES, p).map_or(Require::Any, |r| r.value);
        let mut queues = Vec::new();
        for name in d.str_list("queues", p).map(|q| q.value).unwrap_or_default() {
            if name.value.is_empty() || name.value.len() > MAX_NAME {
                p.at(name.pos, d.key("queues"), "a queue name must be 1 to 255 bytes long");
            } else if !queues.contains(&name.value) {
                queues.push(name.value);
            }
        }
        let heartbeat = d.duration("heartbeat", p).and_then(|h| {
            let secs = u16::try_from(h.value.as_secs()).ok().filter(|_| h.value.subsec_nanos() == 0);
            if secs.is_none() {
                p.at(h.pos, d.key("heartbeat"), "must be whole seconds between 0s (disabled) and 65535s");
            }
            secs
        });

        // One TLS setting for the dependency: its nodes are one cluster.
        let schemes: Vec<bool> =
            url.iter().chain(urls.iter().flat_map(|u| u.value.iter())).map(|u| is_amqps(&u.value)).collect();
        let by_scheme = schemes.iter().any(|t| *t);
        if by_scheme && !schemes.iter().all(|t| *t) {
            let at = urls.as_ref().map(|u| (u.pos, "urls")).or(url.as_ref().map(|u| (u.pos, "url")));
            if let Some((pos, k)) = at {
                p.at(pos, d.key(k), "mixes amqp:// and amqps://; one cluster uses one scheme");
            }
        }
        let tls = tls::parse(d, by_scheme, p);
        (p.count() == before).then_some(AmqpSettings { nodes, password, require, queues, heartbeat, tls })
    }
}

/// The nodes from `url`, `urls`, or `url` + `nodes`; each node once.
fn nodes(
    d: &Map<'_>,
    url: Option<&At<String>>,
    urls: Option<&At<Vec<At<String>>>>,
    list: Option<&At<Vec<At<String>>>>,
    p: &mut Problems,
) -> Vec<AmqpNode> {
    let mut nodes = Vec::new();
    let parsed = |u: &At<String>, k: &str, p: &mut Problems| {
        parse_url(&u.value).map_err(|e| p.at(u.pos, d.key(k), e.to_string())).ok()
    };
    match (url, urls, list) {
        (_, Some(urls), Some(_)) => p.at(urls.pos, d.key("urls"), "set `urls` or `nodes`, not both"),
        (Some(url), Some(_), None) => {
            p.at(url.pos, d.key("url"), "set `url` (optionally with `nodes`) or `urls`, not both");
        }
        (None, None, None) if !d.has("url") && !d.has("urls") => d.missing("url", p),
        (None, None, None) => {}
        (None, Some(urls), None) => {
            if urls.value.is_empty() {
                p.at(urls.pos, d.key("urls"), "must list at least one amqp:// URL");
            }
            nodes.extend(urls.value.iter().filter_map(|u| parsed(u, "urls", p)));
        }
        (None, None, Some(n)) => p.at(n.pos, d.key("nodes"), "`nodes` needs `url` for the user and virtual host"),
        (Some(url), None, None) => nodes.extend(parsed(url, "url", p)),
        (Some(url), None, Some(list)) => {
            if let Some(template) = parsed(url, "url", p) {
                if list.value.is_empty() {
                    p.at(list.pos, d.key("nodes"), "must list at least one host:port");
                }
                for n in &list.value {
                    let address = parse_host_port(&n.value, n.pos, &d.key("nodes"), Some(template.address.port), p);
                    nodes.extend(address.map(|address| AmqpNode { address, ..template.clone() }));
                }
            }
        }
    }
    let mut seen = HashSet::new();
    for n in &nodes {
        if !seen.insert(n.address.clone()) {
            let at = urls.map(|u| (u.pos, "urls")).or(list.map(|l| (l.pos, "nodes")));
            if let Some((pos, k)) = at {
                p.at(pos, d.key(k), format!("{} is listed twice", n.address));
            }
        }
    }
    nodes
}

/// Whether a URL asks for TLS.
fn is_amqps(s: &str) -> bool {
    s.trim().starts_with("amqps://")
}

/// Parses `amqp[s]://[user@]host[:port][/vhost]`; a password in the URL is refused.
pub fn parse_url(s: &str) -> Result<AmqpNode, UrlError> {
    let s = s.trim();
    let (rest, default_port) = if let Some(r) = s.strip_prefix("amqp://") {
        (r, DEFAULT_PORT)
    } else if let Some(r) = s.strip_prefix("amqps://") {
        (r, DEFAULT_TLS_PORT)
    } else {
        return Err(UrlError::Scheme);
    };
    if rest.contains('?') || rest.contains('#') {
        return Err(UrlError::Query);
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let user = match userinfo {
        None => DEFAULT_USER.to_string(),
        Some(u) if u.contains(':') => return Err(UrlError::Password),
        Some(u) => percent_decode(u)?,
    };
    if user.is_empty() {
        return Err(UrlError::EmptyUser);
    }
    if hostport.is_empty() {
        return Err(UrlError::NoHost);
    }
    let address = HostPort::parse(hostport, Some(default_port))?;
    // Both "amqp://h" and "amqp://h/" mean the default vhost "/", as most
    // clients treat it; another vhost is percent-encoded ("/%2f" is "/" too).
    let vhost = match path {
        None | Some("") => "/".to_string(),
        Some(p) if p.contains('/') => return Err(UrlError::VhostSegments),
        Some(p) => percent_decode(p)?,
    };
    if vhost.len() > MAX_NAME {
        return Err(UrlError::VhostLength);
    }
    Ok(AmqpNode { address, user, vhost })
}

fn percent_decode(s: &str) -> Result<String, UrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(UrlError::TruncatedEscape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UrlError::InvalidEscape(hex.to_string()))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::super::testing::load;
    use super::super::{DependencyConfig, DependencyKind};
    use super::*;

    pub(crate) fn settings(dep_yaml: &str) -> Result<(AmqpSettings, DependencyConfig), String> {
        match load("mq", &format!("    type: rabbitmq\n{dep_yaml}")) {
            Ok(dep) => match &dep.kind {
                DependencyKind::Amqp(s) => Ok((s.clone(), dep)),
                _ => panic!("not amqp"),
            },
            Err(p) => Err(p.into_iter().map(|(k, m)| format!("{k}: {m}")).collect::<Vec<_>>().join("\n")),
        }
    }

    #[test]
    fn url_gives_user_host_port_and_vhost() {
        let n = parse_url("amqp://app@mq.local:5673/prod").unwrap();
        assert_eq!(
            n,
            AmqpNode {
                address: HostPort { host: "mq.local".into(), port: 5673 },
                user: "app".into(),
                vhost: "prod".into()
            }
        );
        let n = parse_url("amqp://[::1]").unwrap();
        assert_eq!(
            (n.address.host.as_str(), n.address.port, n.user.as_str(), n.vhost.as_str()),
            ("::1", 5672, "guest", "/")
        );
        assert_eq!(parse_url("amqp://u@h/").unwrap().vhost, "/");
        assert_eq!(parse_url("amqp://u@h/%2f").unwrap().vhost, "/");
        assert_eq!(parse_url("amqp://u%40x@h/a%20b").unwrap().user, "u@x");
    }

    #[test]
    fn password_in_url_and_query_are_config_errors() {
        assert!(parse_url("amqp://u:secret@h/").unwrap_err().to_string().contains("password_env"));
        assert!(parse_url("amqp://u@h/?heartbeat=5").unwrap_err().to_string().contains("query"));
        assert!(parse_url("http://h/").is_err());
        let err = settings("    url: amqp://u:secret@h/\n    password_env: P\n").unwrap_err();
        assert!(err.contains("dependencies[0].url") && !err.contains("secret@"), "{err}");
    }

    #[test]
    fn amqps_url_turns_tls_on_with_port_5671() {
        let (s, _) = settings("    url: amqps://u@h/\n    password_env: P\n").unwrap();
        assert!(s.tls.is_some());
        assert_eq!(s.nodes[0].address.port, 5671);
        let (s, _) = settings("    url: amqp://u@h/\n    password_env: P\n    tls: true\n").unwrap();
        assert!(s.tls.is_some());
        let err = settings("    urls: [amqps://u@a/, amqp://u@b/]\n    password_env: P\n").unwrap_err();
        assert!(err.contains("mixes"), "{err}");
    }

    #[test]
    fn a_user_other_than_guest_needs_a_password_source() {
        let err = settings("    url: amqp://app@h/\n").unwrap_err();
        assert!(err.contains("password_env"), "{err}");
        let (s, _) = settings("    url: amqp://h/\n").unwrap();
        assert_eq!((s.nodes[0].user.as_str(), s.password.is_none()), ("guest", true));
    }

    #[test]
    fn nodes_take_user_and_vhost_from_url_and_require_parses() {
        let (s, _) = settings(
            "    url: amqp://app@x:5673/v\n    password_env: P\n    nodes: [a, 'b:1', '[::1]']\n    require: quorum\n    queues: [q1, q1, q2]\n",
        )
        .unwrap();
        let addrs: Vec<String> = s.nodes.iter().map(|n| n.address.to_string()).collect();
        assert_eq!(addrs, ["a:5673", "b:1", "[::1]:5673"]);
        assert!(s.nodes.iter().all(|n| n.user == "app" && n.vhost == "v"));
        assert_eq!(s.require, Require::Quorum);
        assert_eq!(s.queues, ["q1", "q2"]);
        let err = settings("    urls: [amqp://h1/, amqp://h2/]\n    require: most\n").unwrap_err();
        assert!(err.contains("dependencies[0].require"), "{err}");
        let err = settings("    urls: [amqp://h1/, amqp://h1/]\n").unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn heartbeat_must_be_whole_seconds() {
        assert!(settings("    url: amqp://h/\n    heartbeat: 1500ms\n").unwrap_err().contains("whole seconds"));
        let (s, _) = settings("    url: amqp://h/\n    heartbeat: 0s\n").unwrap();
        assert_eq!(s.heartbeat, Some(0));
    }

    #[test]
    fn require_counts() {
        assert_eq!([Require::Any, Require::Quorum, Require::All].map(|r| r.needed(3)), [1, 2, 3]);
        assert_eq!(Require::Quorum.needed(2), 2);
        assert_eq!(Require::Quorum.needed(1), 1);
    }

    #[test]
    fn a_near_miss_require_value_suggests_the_valid_one() {
        let err = settings("    url: amqp://h/\n    require: quorom\n").unwrap_err();
        assert!(err.contains("did you mean `quorum`?"), "{err}");
    }
}
