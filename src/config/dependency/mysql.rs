//! `type: mysql` (alias `mariadb`) settings.

use super::tls::{self, TlsSettings};
use super::{DependencyType, host_port, non_empty, secret_source};
use crate::config::hostport::HostPort;
use crate::config::node::Map;
use crate::config::problem::Problems;
use crate::config::secret::SecretSource;

/// The MySQL default port.
pub const DEFAULT_PORT: u16 = 3306;

/// Settings of a `mysql` dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct MysqlSettings {
    /// Server address (`host:port`, default port 3306).
    pub address: HostPort,
    /// User name to authenticate as.
    pub user: String,
    /// Where the password comes from (none: empty password).
    pub password: Option<SecretSource>,
    /// Default database to select at connect.
    pub database: Option<String>,
    /// A statement run instead of `COM_PING` (its rows are discarded).
    pub query: Option<String>,
    /// Fail with `not_ready` while `@@read_only` (or MySQL's `@@super_read_only`) is on.
    pub require_writable: bool,
    /// Galera readiness mode, when enabled.
    pub galera: Option<GaleraMode>,
    /// Fail with `too_many_connections` while every ordinary connection
    /// slot is taken (`Threads_connected` at `@@max_connections`).
    pub fail_on_saturation: bool,
    /// TLS (`tls: true`): the client asks the server to switch to TLS and
    /// verifies its certificate before sending credentials.
    pub tls: Option<TlsSettings>,
}

/// How a Galera node's state is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaleraMode {
    /// Accept `wsrep_local_state` 2 (Donor/Desynced) as well as 4 (Synced).
    pub allow_donor: bool,
}

impl DependencyType for MysqlSettings {
    const NAME: &'static str = "mysql";
    const ALIASES: &'static [&'static str] = &["mariadb"];
    const KEYS: &'static [&'static str] = &[
        "address",
        "user",
        "password_env",
        "password_file",
        "database",
        "query",
        "require_writable",
        "galera",
        "galera_allow_donor",
        "fail_on_saturation",
    ];

    fn parse(d: &Map<'_>, p: &mut Problems) -> Option<Self> {
        let before = p.count();
        let address = host_port(d, "address", Some(DEFAULT_PORT), p);
        let user = d.required_str("user", p);
        if let Some(u) = user.as_ref().filter(|u| u.value.is_empty()) {
            p.at(u.pos, d.key("user"), "must not be empty");
        }
        let password = secret_source(d, p);
        let database = non_empty(d, "database", p);
        let query = non_empty(d, "query", p);
        let tls = tls::parse(d, false, p);
        let galera = d.bool("galera", p).is_some_and(|g| g.value);
        let allow_donor = d.bool("galera_allow_donor", p);
        if let Some(a) = &allow_donor
            && !galera
        {
            p.at(a.pos, d.key("galera_allow_donor"), "only has an effect with `galera: true`");
        }
        let require_writable = d.bool("require_writable", p).is_some_and(|r| r.value);
        let fail_on_saturation = d.bool("fail_on_saturation", p).is_none_or(|f| f.value);
        (p.count() == before).then_some(MysqlSettings {
            address: address?,
            user: user?.value,
            password,
            database,
            query,
            require_writable,
            galera: galera.then_some(GaleraMode { allow_donor: allow_donor.is_some_and(|a| a.value) }),
            fail_on_saturation,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::DependencyKind;
    use super::super::testing::{load, problems};
    use super::*;

    fn settings(dep: &str) -> MysqlSettings {
        match load("db", dep).unwrap().kind {
            DependencyKind::Mysql(s) => s,
            other => panic!("not mysql: {other:?}"),
        }
    }

    #[test]
    fn minimal_config_uses_default_port_and_ping() {
        let s = settings("    type: mysql\n    address: db\n    user: hg\n");
        assert_eq!(s.address, HostPort { host: "db".into(), port: 3306 });
        assert_eq!(s.user, "hg");
        assert!(s.password.is_none() && s.query.is_none() && s.galera.is_none() && !s.require_writable);
    }

    #[test]
    fn saturation_is_checked_unless_turned_off() {
        assert!(settings("    type: mysql\n    address: db\n    user: hg\n").fail_on_saturation);
        let off = settings("    type: mysql\n    address: db\n    user: hg\n    fail_on_saturation: false\n");
        assert!(!off.fail_on_saturation);
        let p = problems("    type: redis\n    address: r\n    fail_on_saturation: true\n");
        assert!(p.iter().any(|(k, _)| k.ends_with("fail_on_saturation")), "{p:?}");
    }

    #[test]
    fn full_config_is_accepted() {
        let s = settings(
            "    type: mariadb\n    address: \"[::1]:3307\"\n    user: hg\n    password_file: /run/secrets/pw\n    database: app\n    query: SELECT 1\n    require_writable: true\n    galera: true\n    galera_allow_donor: true\n    tls: false\n",
        );
        assert_eq!(s.address.port, 3307);
        assert_eq!(s.password, Some(SecretSource::File("/run/secrets/pw".into())));
        assert_eq!(s.database.as_deref(), Some("app"));
        assert_eq!(s.galera, Some(GaleraMode { allow_donor: true }));
    }

    #[test]
    fn missing_user_and_address_are_reported() {
        let p = problems("    type: mysql\n");
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"dependencies[0].address") && keys.contains(&"dependencies[0].user"), "{p:?}");
    }

    #[test]
    fn tls_true_gives_tls_settings_verifying_the_configured_host() {
        let s = settings("    type: mysql\n    address: db.internal\n    user: hg\n    tls: true\n");
        assert_eq!(s.tls, Some(TlsSettings::default()));
    }

    #[test]
    fn tls_key_without_tls_is_reported_at_its_key() {
        let p = problems("    type: mysql\n    address: db\n    user: hg\n    tls_server_name: db.internal\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "dependencies[0].tls_server_name");
    }

    #[test]
    fn both_password_sources_are_an_error() {
        let p =
            problems("    type: mysql\n    address: db\n    user: hg\n    password_env: A\n    password_file: /x\n");
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn allow_donor_without_galera_is_an_error() {
        let p = problems("    type: mysql\n    address: db\n    user: hg\n    galera_allow_donor: true\n");
        assert_eq!(p[0].0, "dependencies[0].galera_allow_donor", "{p:?}");
    }

    #[test]
    fn empty_query_and_keys_of_other_types_are_errors() {
        let p = problems("    type: mysql\n    address: db\n    user: hg\n    query: \"\"\n    db: 2\n");
        let keys: Vec<_> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["dependencies[0].query", "dependencies[0].db"], "{p:?}");
    }
}
