//! The config layer's error: every message names the file, line and key, and what would be valid.

use std::path::PathBuf;

use crate::policy::PolicyError;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A TOML syntax or shape error, as the TOML parser reports it.
    #[error("{}:{line}:{col}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: u32,
        col: u32,
        message: String,
    },
    /// A value that parsed but is not acceptable.
    #[error("{}:{line}:{col}: {key}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        line: u32,
        col: u32,
        key: String,
        message: String,
    },
    /// Several problems in eastwall.toml, all reported at once.
    #[error("{}", join(.0.iter().map(ToString::to_string)))]
    Many(Vec<ConfigError>),
    /// Problems in the policy file.
    #[error("{}", join(.0.iter().map(ToString::to_string)))]
    Policy(Vec<PolicyError>),
    #[error("{what}: {message}")]
    Secret { what: String, message: String },
}

fn join(lines: impl Iterator<Item = String>) -> String {
    lines.collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    /// One line per problem, each with its location, for `eastwall policy check`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Many(all) => all.iter().flat_map(ConfigError::lines).collect(),
            ConfigError::Policy(all) => all.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}
