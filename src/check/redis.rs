//! `type: redis` (not built yet: a config naming it is rejected).

use tokio::time::Instant;

use super::{Cause, Check, CheckError};
use crate::config::{DependencyConfig, KindCtx, RawDependency};

/// Keys a `redis` dependency accepts besides the common ones.
pub(crate) const KEYS: &[&str] =
    &["address", "username", "password_env", "password_file", "db", "require_role", "sentinel", "tls"];

/// Settings of a `redis` dependency.
#[derive(Debug, Clone)]
pub struct RedisSettings {}

impl RedisSettings {
    pub(crate) fn from_raw(_d: &RawDependency, ctx: KindCtx<'_>) -> Option<Self> {
        let pos = ctx.pos;
        let key = ctx.key("type");
        ctx.problems.at_pos(pos, key, "`redis` checks are not available in this build yet");
        None
    }
}

/// The `redis` check.
pub struct RedisCheck {}

impl RedisCheck {
    /// Builds the check.
    pub fn new(_settings: RedisSettings, _dep: &DependencyConfig) -> Self {
        RedisCheck {}
    }
}

impl Check for RedisCheck {
    async fn check(&mut self, _deadline: Instant) -> Result<(), CheckError> {
        Err(CheckError::new(Cause::Config, "not available in this build"))
    }
}
