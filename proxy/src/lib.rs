//! Eastwall: an mTLS, identity-aware sidecar that stands in front of PostgreSQL.
//!
//! # Layout
//! - [`cli`]: the `eastwall` verbs, one module each.
#![forbid(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod mfa;
pub mod pgcluster;
pub mod stepup;
