//! `type: postgres` (alias `postgresql`) settings: a server (`host:port` or
//! a `postgres://user@host/database` URL), the role, and what each check runs.

use super::tls::{self, TlsSettings};
use super::{DependencyType, secret_source};
use crate::config::hostport::{HostPort, HostPortError};
use crate::config::node::Map;
use crate::config::problem::{At, Problems};
use crate::config::secret::SecretSource;

/// The PostgreSQL default port.
pub const DEFAULT_PORT: u16 = 5432;
/// `application_name` sent when none is configured.
pub const DEFAULT_APPLICATION_NAME: &str = "healthgate";
/// Longest `application_name` the server keeps (NAMEDATALEN - 1).
const MAX_APPLICATION_NAME: usize = 63;

/// Why an `address` is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// `user:password@` in the URL.
    #[error("a password in the URL is not accepted; use password_env or password_file")]
    Password,
    /// `?sslmode=...` and the like.
    #[error("URL parameters are not supported; use the keys (tls, database, application_name, ...)")]
    Parameters,
    /// A scheme other than postgres:// or postgresql://.
    #[error("write host:port or postgres://user@host:port/database")]
    Scheme,
    /// A `%` escape that does not decode to UTF-8.
    #[error("invalid %-escape in the URL")]
    Escape,
    /// The `host:port` part.
    #[error(transparent)]
    HostPort(#[from] HostPortError),
}

/// What an `address` holds: the server, and from a URL the user and database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The server.
    pub server: HostPort,
    /// `user@` of a URL.
    pub user: Option<String>,
    /// `/database` of a URL.
    pub database: Option<String>,
}

/// Settings of a `postgres` dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresSettings {
    /// Server address (`host:port`, default port 5432).
    pub address: HostPort,
    /// Role to log in as.
    pub user: String,
    /// Where the password comes from (none: trust, or a failing login).
    pub password: Option<SecretSource>,
    /// Database to connect to (default: the server's, the role's name).
    pub database: Option<String>,
    /// `application_name` sent at startup (shown in `pg_stat_activity`).
    pub application_name: String,
    /// A statement run on every check instead of the empty query.
    pub query: Option<String>,
    /// Fail with `not_master` on a standby or a read-only session.
    pub require_writable: bool,
    /// TLS, negotiated with `SSLRequest` and always verified.
    pub tls: Option<TlsSettings>,
}

impl DependencyType for PostgresSettings {
    const NAME: &'static str = "postgres";
    const ALIASES: &'static [&'static str] = &["postgresql"];
    const KEYS: &'static [&'static str] = &[
        "address",
        "user",
        "password_env",
        "password_file",
        "database",
        "application_name",
        "query",
        "require_writable",
    ];

    fn parse(d: &Map<'_>, p: &mut Problems) -> Option<Self> {
        let before = p.count();
        let address = d
            .required_str("address", p)
            .and_then(|a| parse_address(&a.value).map_err(|e| p.at(a.pos, d.key("address"), e.to_string())).ok());
        // A string the protocol carries as a C string: no NUL, not empty.
        let text = |k: &str, p: &mut Problems| -> Option<At<String>> {
            let s = d.str(k, p)?;
            if s.value.trim().is_empty() {
                p.at(s.pos, d.key(k), "must not be empty");
            } else if s.value.contains('\0') {
                p.at(s.pos, d.key(k), "must not contain a NUL character");
            }
            Some(s)
        };
        let user_key = text("user", p);
        let database_key = text("database", p);
        let query = text("query", p).map(|q| q.value);
        let application_name = text("application_name", p);
        if let Some(a) = &application_name
            && (a.value.len() > MAX_APPLICATION_NAME || !a.value.chars().all(|c| c.is_ascii_graphic() || c == ' '))
        {
            p.at(a.pos, d.key("application_name"), "use at most 63 printable ASCII characters");
        }
        let mut user = user_key.as_ref().map(|u| u.value.clone());
        let mut database = database_key.as_ref().map(|d| d.value.clone());
        if let Some(addr) = &address {
            if let Some(u) = &addr.user {
                match &user_key {
                    Some(k) => p.at(k.pos, d.key("user"), "the user is already given in the address URL"),
                    None => user = Some(u.clone()),
                }
            }
            if let Some(db) = &addr.database {
                match &database_key {
                    Some(k) => p.at(k.pos, d.key("database"), "the database is already given in the address URL"),
                    None => database = Some(db.clone()),
                }
            }
        }
        if user.is_none() && !d.has("user") && address.as_ref().is_some_and(|a| a.user.is_none()) {
            d.missing("user", p);
        }
        let password = secret_source(d, p);
        let tls = tls::parse(d, false, p);
        let require_writable = d.bool("require_writable", p).is_some_and(|r| r.value);
        (p.count() == before).then_some(PostgresSettings {
            address: address?.server,
            user: user?,
            password,
            database,
            application_name: application_name.map_or_else(|| DEFAULT_APPLICATION_NAME.to_string(), |a| a.value),
            query,
            require_writable,
            tls,
        })
    }
}

/// Parses `host[:port]` or `postgres[ql]://[user@]host[:port][/database]`.
pub fn parse_address(s: &str) -> Result<Address, AddressError> {
    let s = s.trim();
    let rest = match (s.strip_prefix("postgres://"), s.strip_prefix("postgresql://")) {
        (Some(r), _) | (_, Some(r)) => r,
        _ if s.contains("://") => return Err(AddressError::Scheme),
        _ => {
            let server = HostPort::parse(s, Some(DEFAULT_PORT))?;
            return Ok(Address { server, user: None, database: None });
        }
    };
    if rest.contains('?') {
        return Err(AddressError::Parameters);
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, _)) if u.contains(':') => return Err(AddressError::Password),
        Some((u, h)) => (Some(percent_decode(u)?).filter(|u| !u.is_empty()), h),
        None => (None, authority),
    };
    let database = Some(percent_decode(path)?).filter(|d| !d.is_empty());
    let server = HostPort::parse(hostport, Some(DEFAULT_PORT))?;
    Ok(Address { server, user, database })
}

fn percent_decode(s: &str) -> Result<String, AddressError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).ok_or(AddressError::Escape)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| AddressError::Escape)?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| AddressError::Escape)
}

#[cfg(test)]
mod tests {
    use super::super::DependencyKind;
    use super::super::testing::{load, problems};
    use super::*;

    fn settings(dep: &str) -> PostgresSettings {
        match load("db", dep).unwrap().kind {
            DependencyKind::Postgres(s) => s,
            other => panic!("not postgres: {other:?}"),
        }
    }

    #[test]
    fn minimal_config_uses_default_port_and_application_name() {
        let s = settings("    type: postgres\n    address: db\n    user: hg\n");
        assert_eq!(s.address, HostPort { host: "db".into(), port: 5432 });
        assert_eq!(s.user, "hg");
        assert_eq!(s.application_name, "healthgate");
        assert!(s.password.is_none() && s.query.is_none() && s.database.is_none() && !s.require_writable);
        assert!(s.tls.is_none());
    }

    #[test]
    fn url_gives_user_and_database() {
        let s = settings("    type: postgresql\n    address: postgres://hg%40x@[::1]:6432/app\n");
        assert_eq!(s.address, HostPort { host: "::1".into(), port: 6432 });
        assert_eq!(s.user, "hg@x");
        assert_eq!(s.database.as_deref(), Some("app"));
        let s = settings("    type: postgres\n    address: postgresql://db.svc\n    user: hg\n");
        assert_eq!(s.address.port, 5432);
    }

    #[test]
    fn full_config_is_accepted() {
        let s = settings(
            "    type: postgres\n    address: \"db:5433\"\n    user: hg\n    password_file: /run/secrets/pw\n    database: app\n    application_name: hg-pod\n    query: SELECT 1\n    require_writable: true\n",
        );
        assert_eq!(s.address.port, 5433);
        assert_eq!(s.password, Some(SecretSource::File("/run/secrets/pw".into())));
        assert_eq!(s.application_name, "hg-pod");
        assert!(s.require_writable);
    }

    #[test]
    fn password_in_the_url_is_an_error_that_does_not_repeat_it() {
        let p = problems("    type: postgres\n    address: postgres://hg:s3cret@db/app\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "dependencies[0].address");
        assert!(p[0].1.contains("password") && !p[0].1.contains("s3cret"), "{p:?}");
    }

    #[test]
    fn url_parameters_and_other_schemes_are_errors() {
        assert_eq!(parse_address("postgres://db/app?sslmode=require"), Err(AddressError::Parameters));
        assert_eq!(parse_address("mysql://db"), Err(AddressError::Scheme));
        assert_eq!(parse_address("postgres://a%zz@db"), Err(AddressError::Escape));
    }

    #[test]
    fn user_or_database_twice_is_an_error() {
        let p = problems("    type: postgres\n    address: postgres://a@db/x\n    user: b\n    database: y\n");
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["dependencies[0].user", "dependencies[0].database"], "{p:?}");
    }

    #[test]
    fn missing_user_and_address_are_reported() {
        let p = problems("    type: postgres\n");
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"dependencies[0].address"), "{p:?}");
        let p = problems("    type: postgres\n    address: db\n");
        assert_eq!(p[0].0, "dependencies[0].user", "{p:?}");
    }

    #[test]
    fn bad_values_and_keys_of_other_types_are_errors() {
        let p = problems(
            "    type: postgres\n    address: db\n    user: hg\n    query: \"\"\n    application_name: \"é\"\n    galera: true\n",
        );
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec!["dependencies[0].query", "dependencies[0].application_name", "dependencies[0].galera"],
            "{p:?}"
        );
    }

    #[test]
    fn tls_keys_need_tls() {
        let s = settings("    type: postgres\n    address: db\n    user: hg\n    tls: true\n");
        assert!(s.tls.is_some());
        let p = problems("    type: postgres\n    address: db\n    user: hg\n    tls_server_name: db.internal\n");
        assert_eq!(p[0].0, "dependencies[0].tls_server_name", "{p:?}");
    }
}
