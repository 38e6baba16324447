//! The small CA behind Eastwall: a trust-domain root that issues short-lived X.509-SVIDs.
//!
//! # Layout
//! - [`spiffe`]: `SpiffeId` and `TrustDomain`, parsed strictly by the SPIFFE-ID standard.
//! - [`authority`]: the CA folder (`ca.pem`, `ca.key`, `crl.pem`, `index.json`): init, open,
//!   trust bundle, revocation and the signed CRL.
//! - [`issue`]: X.509-SVID issuance, with a fresh key or for a CSR's public key.
//! - [`index`]: the record of every issued certificate.
//! - `files`: atomic, never-world-readable writes and the folder lock.
//! - `serial`, `duration`: random serials and "1h"-style durations.
//! - `testing` (feature `testing`): deliberately malformed SVIDs for refusal tests.
#![forbid(unsafe_code)]

pub mod authority;
mod duration;
mod error;
mod files;
pub mod index;
pub mod issue;
mod serial;
pub mod spiffe;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use authority::{Ca, RevokeTarget, BACKDATE, CRL_VALIDITY, DEFAULT_CA_TTL};
pub use duration::parse_duration;
pub use error::CaError;
pub use files::write_private;
pub use index::IndexRecord;
pub use issue::{csr_public_key, IssueRequest, IssuedCert, DEFAULT_LEAF_TTL};
pub use serial::normalize_serial;
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
