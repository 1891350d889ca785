//! `type: amqp` (not built yet: a config naming it is rejected).

use tokio::time::Instant;

use super::{Cause, Check, CheckError};
use crate::config::{DependencyConfig, KindCtx, RawDependency};

/// Keys a `amqp` dependency accepts besides the common ones.
pub(crate) const KEYS: &[&str] =
    &["url", "urls", "nodes", "require", "password_env", "password_file", "queues", "heartbeat", "tls"];

/// Settings of a `amqp` dependency.
#[derive(Debug, Clone)]
pub struct AmqpSettings {}

impl AmqpSettings {
    pub(crate) fn from_raw(_d: &RawDependency, ctx: KindCtx<'_>) -> Option<Self> {
        let pos = ctx.pos;
        let key = ctx.key("type");
        ctx.problems.at_pos(pos, key, "`amqp` checks are not available in this build yet");
        None
    }
}

/// The `amqp` check.
pub struct AmqpCheck {}

impl AmqpCheck {
    /// Builds the check.
    pub fn new(_settings: AmqpSettings, _dep: &DependencyConfig) -> Self {
        AmqpCheck {}
    }
}

impl Check for AmqpCheck {
    async fn check(&mut self, _deadline: Instant) -> Result<(), CheckError> {
        Err(CheckError::new(Cause::Config, "not available in this build"))
    }
}
