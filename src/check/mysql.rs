//! `type: mysql` (not built yet: a config naming it is rejected).

use tokio::time::Instant;

use super::{Cause, Check, CheckError};
use crate::config::{DependencyConfig, KindCtx, RawDependency};

/// Keys a `mysql` dependency accepts besides the common ones.
pub(crate) const KEYS: &[&str] = &[
    "address",
    "user",
    "password_env",
    "password_file",
    "database",
    "query",
    "require_writable",
    "galera",
    "galera_allow_donor",
    "tls",
];

/// Settings of a `mysql` dependency.
#[derive(Debug, Clone)]
pub struct MysqlSettings {}

impl MysqlSettings {
    pub(crate) fn from_raw(_d: &RawDependency, ctx: KindCtx<'_>) -> Option<Self> {
        let pos = ctx.pos;
        let key = ctx.key("type");
        ctx.problems.at_pos(pos, key, "`mysql` checks are not available in this build yet");
        None
    }
}

/// The `mysql` check.
pub struct MysqlCheck {}

impl MysqlCheck {
    /// Builds the check.
    pub fn new(_settings: MysqlSettings, _dep: &DependencyConfig) -> Self {
        MysqlCheck {}
    }
}

impl Check for MysqlCheck {
    async fn check(&mut self, _deadline: Instant) -> Result<(), CheckError> {
        Err(CheckError::new(Cause::Config, "not available in this build"))
    }
}
