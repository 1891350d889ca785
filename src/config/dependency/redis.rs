//! `type: redis` settings: a node (`host:port` or a `redis[s]://` URL) or the
//! Sentinels that name the current master.

use super::tls::{self, TlsSettings};
use super::{DependencyType, Impact, parse_host_port, secret_source};
use crate::config::hostport::{HostPort, HostPortError};
use crate::config::node::Map;
use crate::config::problem::Problems;
use crate::config::secret::SecretSource;

/// Port used when an address has none.
pub const DEFAULT_PORT: u16 = 6379;
/// Port used when a sentinel address has none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;
/// Keys of `sentinel:`.
const SENTINEL_KEYS: &[&str] = &["addresses", "master_name", "password_env", "password_file"];
/// The roles `require_role` accepts (both mean master).
const ROLES: &[&str] = &["master", "primary"];

/// Why a Redis address does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// A scheme other than `redis://` or `rediss://`.
    #[error("write host:port or redis[s]://host:port/db")]
    Scheme,
    /// `user:password@` in the URL.
    #[error("credentials in the URL are not accepted; use username and password_env / password_file")]
    Credentials,
    /// `?...` in the URL.
    #[error("URL query parameters are not supported")]
    Query,
    /// The path is not a database number.
    #[error("{0:?} is not a database number")]
    Db(String),
    /// The host and port do not parse.
    #[error(transparent)]
    HostPort(#[from] HostPortError),
}

/// Where the check finds its Redis node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A fixed `host:port` (every resolved address is tried).
    Direct(HostPort),
    /// Ask Redis Sentinels for the current master.
    Sentinel(SentinelSettings),
}

/// `sentinel:` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelSettings {
    /// Sentinel addresses, asked in turn.
    pub addresses: Vec<HostPort>,
    /// The monitored master's name (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// The sentinels' own password (`requirepass` in sentinel.conf), if any.
    pub password: Option<SecretSource>,
}

/// Settings of a `redis` dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// The node, or the sentinels that name it.
    pub target: Target,
    /// ACL user name (Redis 6+); `AUTH <username> <password>`.
    pub username: Option<String>,
    /// Where the password comes from; read at every connect.
    pub password: Option<SecretSource>,
    /// Logical database selected after connecting (0 is not sent).
    pub db: u32,
    /// Healthy only if `ROLE` says master (always true with a sentinel).
    pub require_master: bool,
    /// TLS for the node and the sentinels (`rediss://` or `tls: true`).
    pub tls: Option<TlsSettings>,
}

impl DependencyType for RedisSettings {
    const NAME: &'static str = "redis";
    const KEYS: &'static [&'static str] =
        &["address", "username", "password_env", "password_file", "db", "require_role", "sentinel"];
    /// A cache outage usually slows the app rather than breaking it.
    const DEFAULT_IMPACT: Impact = Impact::Degraded;

    fn parse(d: &Map<'_>, p: &mut Problems) -> Option<Self> {
        let before = p.count();
        let mut url_db = None;
        let mut url_tls = false;
        let target = match (d.str("address", p), d.get("sentinel")) {
            (Some(_), Some(s)) => {
                p.at(s.pos, d.key("sentinel"), "set either `address` or `sentinel`, not both");
                None
            }
            (None, None) if !d.has("address") => {
                p.at(d.pos, d.key("address"), "missing key `address` (or `sentinel`)");
                None
            }
            (None, None) => None,
            (Some(a), None) => match parse_address(&a.value) {
                Ok((hp, db, tls)) => {
                    url_db = db;
                    url_tls = tls;
                    Some(Target::Direct(hp))
                }
                Err(e) => {
                    p.at(a.pos, d.key("address"), e.to_string());
                    None
                }
            },
            (None, Some(_)) => d.map("sentinel", p).map(|s| Target::Sentinel(sentinel(&s, p))),
        };
        let password = secret_source(d, p);
        let username = d.str("username", p);
        if let Some(u) = &username {
            if u.value.is_empty() {
                p.at(u.pos, d.key("username"), "must not be empty");
            } else if !d.has("password_env") && !d.has("password_file") {
                p.at(u.pos, d.key("username"), "an ACL username needs password_env or password_file");
            }
        }
        let mut db = url_db.unwrap_or(0);
        if let Some(v) = d.get("db").and_then(|n| n.int::<i64>(&d.key("db"), p)) {
            if url_db.is_some() {
                p.at(v.pos, d.key("db"), "the database is already given in the address URL");
            }
            match u32::try_from(v.value) {
                Ok(n) if n <= i32::MAX as u32 => db = n,
                _ => p.at(v.pos, d.key("db"), "must be a database number from 0"),
            }
        }
        let mut require_master = matches!(target, Some(Target::Sentinel(_)));
        if let Some(r) = d.str("require_role", p) {
            if ROLES.contains(&r.value.as_str()) {
                require_master = true;
            } else {
                let hint = crate::config::problem::suggestion(&r.value, ROLES.iter().copied());
                p.at(
                    r.pos,
                    d.key("require_role"),
                    format!("unknown role {:?}{hint}; expected master (alias primary)", r.value),
                );
            }
        }
        let tls = tls::parse(d, url_tls, p);
        (p.count() == before).then_some(RedisSettings {
            target: target?,
            username: username.map(|u| u.value),
            password,
            db,
            require_master,
            tls,
        })
    }
}

/// Reads `sentinel:`.
fn sentinel(s: &Map<'_>, p: &mut Problems) -> SentinelSettings {
    s.deny_unknown(SENTINEL_KEYS, p);
    let key = s.key("addresses");
    let mut addresses = Vec::new();
    match s.str_list("addresses", p) {
        Some(list) if list.value.is_empty() => p.at(list.pos, &*key, "list at least one sentinel address"),
        Some(list) => {
            for a in list.value {
                if a.value.contains("://") {
                    p.at(a.pos, &*key, "write sentinel addresses as host:port");
                } else {
                    addresses.extend(parse_host_port(&a.value, a.pos, &key, Some(DEFAULT_SENTINEL_PORT), p));
                }
            }
        }
        None if !s.has("addresses") => s.missing("addresses", p),
        None => {}
    }
    let master_name = s.required_str("master_name", p).map(|m| m.value.trim().to_string()).unwrap_or_default();
    if master_name.is_empty()
        && let Some(m) = s.get("master_name")
    {
        p.at(m.pos, s.key("master_name"), "must name the monitored master");
    }
    SentinelSettings { addresses, master_name, password: secret_source(s, p) }
}

/// Parses `host[:port]`, `redis://host[:port][/db]` or `rediss://...`
/// (TLS: the third value).
pub fn parse_address(s: &str) -> Result<(HostPort, Option<u32>, bool), AddressError> {
    let s = s.trim();
    let (rest, tls) = match (s.strip_prefix("redis://"), s.strip_prefix("rediss://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ if s.contains("://") => return Err(AddressError::Scheme),
        _ => return Ok((HostPort::parse(s, Some(DEFAULT_PORT))?, None, false)),
    };
    if rest.contains('@') {
        return Err(AddressError::Credentials);
    }
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, p),
        None => (rest, ""),
    };
    if authority.contains('?') || path.contains('?') {
        return Err(AddressError::Query);
    }
    let db = match path {
        "" => None,
        p => Some(p.parse::<u32>().map_err(|_| AddressError::Db(p.to_string()))?),
    };
    Ok((HostPort::parse(authority, Some(DEFAULT_PORT))?, db, tls))
}

#[cfg(test)]
mod tests {
    use super::super::DependencyKind;
    use super::super::testing::load;
    use super::*;

    fn settings(dep_yaml: &str) -> Result<RedisSettings, Vec<String>> {
        let body = format!("    type: redis\n{}", dep_yaml.lines().map(|l| format!("    {l}\n")).collect::<String>());
        match load("cache", &body) {
            Ok(d) => match d.kind {
                DependencyKind::Redis(s) => Ok(s),
                _ => unreachable!(),
            },
            Err(problems) => Err(problems.into_iter().map(|(k, m)| format!("{k}: {m}")).collect()),
        }
    }

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort { host: host.into(), port }
    }

    #[test]
    fn address_defaults_port_and_db() {
        let s = settings("address: cache").unwrap();
        assert_eq!(s.target, Target::Direct(hp("cache", 6379)));
        assert_eq!((s.db, s.require_master, s.password.is_none()), (0, false, true));
    }

    #[test]
    fn redis_url_gives_host_port_and_db() {
        let s = settings("address: redis://cache:6380/4").unwrap();
        assert_eq!(s.target, Target::Direct(hp("cache", 6380)));
        assert_eq!(s.db, 4);
    }

    #[test]
    fn rediss_url_and_tls_true_turn_tls_on() {
        for y in ["address: cache\ntls: true", "address: rediss://cache:6380", "address: rediss://cache/2"] {
            assert!(settings(y).unwrap().tls.is_some(), "{y}");
        }
        assert!(settings("address: cache\ntls: false").unwrap().tls.is_none());
        assert!(settings("address: redis://cache").unwrap().tls.is_none());
    }

    #[test]
    fn rediss_url_with_tls_false_is_a_contradiction() {
        let p = settings("address: rediss://cache\ntls: false").unwrap_err();
        assert!(p.iter().any(|m| m.contains("remove `tls: false`")), "{p:?}");
    }

    #[test]
    fn credentials_in_url_are_refused() {
        let p = settings("address: redis://:pw@cache:6379").unwrap_err();
        assert!(p.iter().any(|m| m.contains("credentials in the URL")), "{p:?}");
    }

    #[test]
    fn address_and_sentinel_are_exclusive_and_one_is_required() {
        let both = settings("address: a\nsentinel:\n  addresses: [s1]\n  master_name: m").unwrap_err();
        assert!(both.iter().any(|m| m.contains("not both")), "{both:?}");
        let none = settings("db: 1").unwrap_err();
        assert!(none.iter().any(|m| m.contains("missing key `address`")), "{none:?}");
    }

    #[test]
    fn sentinel_settings_parse_and_imply_master() {
        let s = settings(
            "sentinel:\n  addresses: [\"s1\", \"10.0.0.2:5000\"]\n  master_name: mymaster\n  password_env: SENT_PW",
        )
        .unwrap();
        let Target::Sentinel(sent) = &s.target else { panic!("{s:?}") };
        assert_eq!(sent.addresses, vec![hp("s1", 26379), hp("10.0.0.2", 5000)]);
        assert_eq!(sent.master_name, "mymaster");
        assert_eq!(sent.password, Some(SecretSource::Env("SENT_PW".into())));
        assert!(s.require_master);
    }

    #[test]
    fn role_db_and_username_are_validated() {
        assert!(settings("address: a\nrequire_role: primary").unwrap().require_master);
        assert!(settings("address: a\nrequire_role: leader").is_err());
        assert!(settings("address: a\ndb: -1").is_err());
        let p = settings("address: a\nusername: app").unwrap_err();
        assert!(p.iter().any(|m| m.contains("needs password_env")), "{p:?}");
        let s = settings("address: a\nusername: app\npassword_file: /run/pw\ndb: 2").unwrap();
        assert_eq!((s.username.as_deref(), s.db), (Some("app"), 2));
    }

    #[test]
    fn a_near_miss_role_suggests_the_valid_one() {
        let p = settings("address: a\nrequire_role: mastr").unwrap_err();
        assert!(p.iter().any(|m| m.contains("did you mean `master`?")), "{p:?}");
    }
}
