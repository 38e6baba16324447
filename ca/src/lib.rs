//! The small CA behind Eastwall: a trust-domain root that issues short-lived X.509-SVIDs.
//!
//! # Layout
//! - [`spiffe`]: `SpiffeId` and `TrustDomain`, parsed strictly by the SPIFFE-ID standard.
#![forbid(unsafe_code)]

pub mod spiffe;

pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
