//! The CA layer's one error type: every message names the file or input and what to do next.

use std::io;
use std::path::PathBuf;

use crate::spiffe::SpiffeIdError;

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: could not {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "a CA already exists in {0} (ca.pem or ca.key is present); pass --force to replace it, \
         which makes every certificate it issued untrusted"
    )]
    AlreadyExists(PathBuf),

    #[error(
        "no CA in {dir}: {file} is missing; run `eastwall ca init --dir {dir} --trust-domain DOMAIN` first"
    )]
    NotInitialised { dir: PathBuf, file: &'static str },

    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("{path} has group or world access (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error(
        "{key} is not the private key of the certificate in {cert}; restore the matching pair"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },

    #[error(
        "the CA certificate {path} expired at {at}; create a new CA with `eastwall ca init --force`"
    )]
    CaExpired { path: PathBuf, at: String },

    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),

    #[error("invalid duration {input:?}: {reason}; write it like 1h, 30m or 90d")]
    InvalidDuration { input: String, reason: String },

    #[error("invalid validity: {0}")]
    InvalidValidity(String),

    #[error(
        "invalid DNS name {0:?}: use letters, digits and '-' in dot-separated labels, optionally \
         starting with \"*.\""
    )]
    InvalidDnsName(String),

    #[error("invalid common name {0:?}: it must be 1 to 64 characters with no control characters")]
    InvalidCommonName(String),

    #[error("certificate signing request {source_name}: {reason}")]
    InvalidCsr { source_name: String, reason: String },

    #[error("invalid serial {0:?}: expected hex digits (colons allowed), as printed by `eastwall ca issue`")]
    InvalidSerial(String),

    #[error("no certificate with serial {serial} was issued by this CA (see {index})")]
    UnknownSerial { serial: String, index: PathBuf },

    #[error("no unexpired certificate was issued to {id} by this CA (see {index})")]
    NothingToRevoke { id: String, index: PathBuf },

    #[error("could not sign the {what}: {source}")]
    Signing {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

impl CaError {
    pub(crate) fn io(path: impl Into<PathBuf>, action: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            action,
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn signing(what: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |source| Self::Signing { what, source }
    }
}
