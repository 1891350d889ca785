//! The `reload` section: how the running process notices a changed config
//! file (docs/reload.md). SIGHUP and `POST /control/reload` always work.

use std::time::Duration;

use super::node::Map;
use super::problem::Problems;

/// Keys of `reload`.
const KEYS: &[&str] = &["poll_interval"];

/// Default time between two looks at the config file.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest poll interval: each look reads and hashes the whole file.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Reload settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReloadConfig {
    /// Every this long the config file is read through its symlinks and
    /// hashed; a new content is reloaded. `0` turns the watch off.
    pub poll_interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig { poll_interval: DEFAULT_POLL_INTERVAL }
    }
}

/// Reads the `reload` section (absent: the defaults).
pub(super) fn reload(section: Option<&Map<'_>>, p: &mut Problems) -> ReloadConfig {
    let d = ReloadConfig::default();
    let Some(r) = section else { return d };
    r.deny_unknown(KEYS, p);
    let poll_interval = match r.duration("poll_interval", p) {
        Some(t) if !t.value.is_zero() && t.value < MIN_POLL_INTERVAL => {
            p.at(t.pos, r.key("poll_interval"), "must be 0 (off) or at least 100ms");
            d.poll_interval
        }
        Some(t) => t.value,
        None => d.poll_interval,
    };
    ReloadConfig { poll_interval }
}

/// FNV-1a of the config text, cut to 53 bits so that the metric's float
/// value (`healthgate_config_hash`) holds it exactly.
pub fn hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << 53) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use std::path::Path;

    const MINIMAL: &str = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n";

    #[test]
    fn the_poll_interval_defaults_to_5s_and_0_turns_the_watch_off() {
        let c = Config::from_yaml(MINIMAL, Path::new("t")).unwrap();
        assert_eq!(c.reload.poll_interval, DEFAULT_POLL_INTERVAL);
        let c = Config::from_yaml(&format!("reload:\n  poll_interval: 0s\n{MINIMAL}"), Path::new("t")).unwrap();
        assert_eq!(c.reload.poll_interval, Duration::ZERO);
    }

    #[test]
    fn a_too_short_poll_interval_is_an_error_at_its_line() {
        match Config::from_yaml(&format!("reload:\n  poll_interval: 10ms\n{MINIMAL}"), Path::new("t")) {
            Err(ConfigError::Invalid { problems, .. }) => {
                assert_eq!((problems[0].line, problems[0].key.as_str()), (2, "reload.poll_interval"), "{problems:?}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_hash_follows_the_text_and_fits_a_float() {
        assert_eq!(hash("a"), hash("a"));
        assert_ne!(hash("a"), hash("b"));
        assert!(hash("anything") < 1 << 53);
    }
}
