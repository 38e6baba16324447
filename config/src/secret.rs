//! Secrets the proxy holds for its upstream login: where they come from, and a value that never prints.

use std::fmt;
use std::path::PathBuf;

use crate::error::ConfigError;

/// A secret value; `Debug` prints `Secret(***)` so it cannot leak through logs or panics.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value itself, for the one place that needs it (the upstream login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the upstream password lives; never in eastwall.toml itself, which ends up in
/// backups, tickets and version control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// A file holding the password (one trailing newline is ignored).
    File(PathBuf),
    /// An environment variable holding the password.
    Env(String),
}

impl PasswordSource {
    /// Reads the secret now, so that a rotated file is picked up on the next login.
    pub fn read(&self) -> Result<Secret, ConfigError> {
        let value = match self {
            PasswordSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Secret {
                    what: format!("upstream.password_file {}", path.display()),
                    message: format!("cannot read it: {e}"),
                })?;
                let text = text
                    .strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text);
                text.to_owned()
            }
            PasswordSource::Env(var) => std::env::var(var).map_err(|e| ConfigError::Secret {
                what: format!("upstream.password_env {var}"),
                message: format!("expected the environment variable to hold the password: {e}"),
            })?,
        };
        if value.is_empty() {
            return Err(ConfigError::Secret {
                what: match self {
                    PasswordSource::File(p) => format!("upstream.password_file {}", p.display()),
                    PasswordSource::Env(v) => format!("upstream.password_env {v}"),
                },
                message: "the password is empty; expected the upstream role's password".into(),
            });
        }
        Ok(Secret(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_source_strips_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let s = PasswordSource::File(path).read().unwrap();
        assert_eq!(s.expose(), "s3cret");
    }

    #[test]
    fn missing_file_and_empty_password_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = PasswordSource::File(dir.path().join("nope"))
            .read()
            .unwrap_err();
        assert!(
            missing.to_string().contains("upstream.password_file"),
            "{missing}"
        );
        let path = dir.path().join("empty");
        std::fs::write(&path, "\n").unwrap();
        let empty = PasswordSource::File(path).read().unwrap_err();
        assert!(empty.to_string().contains("empty"), "{empty}");
    }

    #[test]
    fn env_source_names_the_variable_when_unset() {
        let err = PasswordSource::Env("EASTWALL_TEST_SURELY_UNSET_VAR".into())
            .read()
            .unwrap_err();
        assert!(
            err.to_string().contains("EASTWALL_TEST_SURELY_UNSET_VAR"),
            "{err}"
        );
    }
}
