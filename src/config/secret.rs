//! Secrets (passwords): where they come from and a value that never prints.
//! Imports nothing from the crate, so any layer may use it.

use std::fmt;
use std::path::PathBuf;

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set (or not Unicode).
    #[error("environment variable {0} is not set")]
    EnvNotSet(String),
    /// The file could not be read.
    #[error("cannot read password file {}: {}", path.display(), kind)]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (the kind only: the message could quote the path twice).
        kind: std::io::ErrorKind,
    },
}

/// Where a secret (a password) comes from. The value itself is read when
/// needed and never stored in the config, logged or shown.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable's name.
    Env(String),
    /// A file (e.g. a mounted Kubernetes Secret); surrounding whitespace is trimmed.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(n) => write!(f, "env:{n}"),
            SecretSource::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl SecretSource {
    /// Reads the secret now (at every connect, so a rotated Secret is picked up).
    pub fn read(&self) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Env(name) => {
                std::env::var(name).map(Secret).map_err(|_| SecretError::EnvNotSet(name.clone()))
            }
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\r', '\n']).to_string()))
                .map_err(|e| SecretError::File { path: path.clone(), kind: e.kind() }),
        }
    }
}

/// A secret value; `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "\"***\"");
    }

    #[test]
    fn a_missing_variable_names_the_variable_and_not_a_value() {
        let e = SecretSource::Env("HEALTHGATE_TEST_SURELY_UNSET".into()).read().unwrap_err();
        assert_eq!(e.to_string(), "environment variable HEALTHGATE_TEST_SURELY_UNSET is not set");
    }
}
