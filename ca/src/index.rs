//! The issuance index (`DIR/index.json`): every certificate the CA signed, by serial, with its
//! SPIFFE ID, validity and revocation state. Revocation by SPIFFE ID and the CRL are built from it.

use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::CaError;
use crate::files;

const INDEX_VERSION: u32 = 1;

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRecord {
    /// Lowercase hex, no colons, no leading zero bytes.
    pub serial: String,
    pub spiffe_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(default)]
    pub dns: Vec<String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub common_name: Option<String>,
    /// True when the key came from a CSR, so the CA never saw the private key.
    #[serde(default)]
    pub from_csr: bool,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// The whole index file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Index {
    pub version: u32,
    pub trust_domain: String,
    /// The number of the CRL most recently written; each new CRL takes the next one.
    pub crl_number: u64,
    pub certs: Vec<IndexRecord>,
}

impl Index {
    pub(crate) fn new(trust_domain: &str) -> Self {
        Self {
            version: INDEX_VERSION,
            trust_domain: trust_domain.to_owned(),
            crl_number: 0,
            certs: Vec::new(),
        }
    }

    pub(crate) fn load(path: &Path) -> Result<Self, CaError> {
        let text = files::read_text(path)?;
        let index: Self = serde_json::from_str(&text)
            .map_err(|e| CaError::corrupt(path, format!("not a valid issuance index: {e}")))?;
        if index.version != INDEX_VERSION {
            return Err(CaError::corrupt(
                path,
                format!(
                    "index version {} is not supported (expected {INDEX_VERSION})",
                    index.version
                ),
            ));
        }
        Ok(index)
    }

    pub(crate) fn save(&self, path: &Path) -> Result<(), CaError> {
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| CaError::corrupt(path, format!("could not encode the index: {e}")))?;
        text.push('\n');
        files::write_public(path, text.as_bytes())
    }
}
