//! Sidecar settings and the policy language: files a security team writes, turned into values.
//!
//! # Layout
//! - [`settings`]: `eastwall.toml`, every key documented with its default; [`Config::load`].
//! - [`policy`]: the policy language (grammar and meaning documented there), compiled at load.
//! - [`pattern`]: SPIFFE ID patterns (`*` one segment, `**` one or more) behind segments and groups.
//! - [`decision`]: [`authorize`] and [`explain`], pure evaluation of one request.
//! - [`detect`]: `[detect]`, the inline detectors' switch, state file, automatic locks, tuning.
//! - [`mfa_roles`]: roles an `mfa(..)` rule protects from every other identity.
//! - [`secret`]: where the upstream password comes from, and a value that never prints.
//! - [`error`]: [`ConfigError`], whose messages name file, line and key.
#![forbid(unsafe_code)]

pub mod decision;
pub mod detect;
pub mod error;
pub mod fleet;
pub mod mfa_roles;
pub mod pattern;
pub mod policy;
pub mod secret;
pub mod settings;

pub use decision::{authorize, explain, Decision, Request, Verdict};
pub use detect::DetectSettings;
pub use error::ConfigError;
pub use fleet::{FleetSettings, OnStale};
pub use mfa_roles::{MfaRoles, Protection};
pub use pattern::{IdPattern, PatternError};
pub use policy::{Policy, PolicyError, RuleCounts, RuleKind, RuleRef};
pub use secret::{FileStamp, PasswordSource, Secret};
pub use settings::{
    AdminSettings, AuditSettings, Config, Limits, ListenSettings, MfaSettings, Settings,
    UpstreamLogin, UpstreamSettings, UpstreamTarget, DEFAULT_ADMIN_LISTEN,
    DEFAULT_MAX_SESSIONS_PER_IDENTITY,
};
