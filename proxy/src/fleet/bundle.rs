//! What the fleet bucket holds, key by key: the policy bundle (`policy`), locks (`lock.<id>`) and their removals, each a signed body; and the names of the log subjects.

use std::collections::BTreeMap;
use std::time::SystemTime;

use eastwall_ca::spiffe::TrustDomain;
use eastwall_config::Policy;
use serde::{Deserialize, Serialize};

use crate::locks::Lock;

/// The key of the policy bundle.
pub const POLICY_KEY: &str = "policy";
/// The prefix of every lock's key.
pub const LOCK_PREFIX: &str = "lock.";

pub fn lock_key(id: &str) -> String {
    format!("{LOCK_PREFIX}{id}")
}

/// The subject a sidecar publishes its decision lines to.
pub fn log_subject(name: &str) -> String {
    format!("eastwall.log.{name}")
}

/// The subject a sidecar publishes its chain heads to.
pub fn head_subject(name: &str) -> String {
    format!("eastwall.log.{name}.head")
}

/// The policy as pushed: the policy file's text and the segments and groups it uses, so
/// every sidecar judges with the same names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBundle {
    /// Above the version in force, or it is refused (a replayed older bundle).
    pub version: u64,
    /// RFC 3339.
    pub pushed_at: String,
    /// The pusher's SPIFFE ID; must be the signer's.
    pub pushed_by: String,
    /// The policy file's name as the pusher's eastwall.toml wrote it (decisions cite it).
    pub label: String,
    pub text: String,
    pub segments: BTreeMap<String, Vec<String>>,
    pub groups: BTreeMap<String, Vec<String>>,
}

impl PolicyBundle {
    /// Compiles the bundle for a sidecar in `td` guarding `guards`.
    pub fn compile(&self, td: &TrustDomain, guards: &str) -> Result<Policy, String> {
        if !self.segments.contains_key(guards) {
            return Err(format!(
                "it defines no segment {guards:?}, the one this sidecar guards"
            ));
        }
        for (name, patterns) in self.segments.iter().chain(&self.groups) {
            for p in patterns {
                eastwall_config::IdPattern::parse(p, Some(td))
                    .map_err(|e| format!("{name}: {e}"))?;
            }
        }
        Policy::parse_in(
            &self.label,
            &self.text,
            &self.segments,
            &self.groups,
            Some(td),
        )
        .map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// A lock key's body: a lock, or its removal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum LockBody {
    /// The lock file's record of one lock.
    Lock { lock: serde_json::Value },
    /// `eastwall lock remove --fleet`: an unsigned delete does not lift a lock.
    Removed {
        id: String,
        removed_at: String,
        removed_by: String,
    },
}

/// What one lock key says, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockValue {
    Lock(Lock),
    Removed,
}

/// Parses a lock key's verified body; the lock's id must be the key's, and the signer must
/// be the one it names.
pub fn parse_lock(
    key: &str,
    body: &str,
    signer: &str,
    td: &TrustDomain,
) -> Result<LockValue, String> {
    let id = key.strip_prefix(LOCK_PREFIX).unwrap_or_default();
    let body: LockBody = serde_json::from_str(body).map_err(|e| format!("not a lock body: {e}"))?;
    match body {
        LockBody::Lock { lock } => {
            let lock = crate::locks::lock_from_json(lock, td)?;
            if lock.id != id {
                return Err(format!("the lock's id {:?} is not its key's", lock.id));
            }
            if lock.created_by != signer {
                return Err(format!(
                    "created_by {:?} is not the signer {signer}",
                    lock.created_by
                ));
            }
            Ok(LockValue::Lock(lock))
        }
        LockBody::Removed {
            id: removed,
            removed_by,
            ..
        } => {
            if removed != id {
                return Err(format!("removes {removed:?}, stored under {key:?}"));
            }
            if removed_by != signer {
                return Err(format!(
                    "removed_by {removed_by:?} is not the signer {signer}"
                ));
            }
            Ok(LockValue::Removed)
        }
    }
}

/// RFC 3339 of `t`, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A chain head as published every `[fleet] head_interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub sidecar: String,
    /// RFC 3339, when published.
    pub at: String,
    /// The `ts` of the last line it covers.
    pub ts: String,
    /// That line's `hash`.
    pub hash: String,
    /// Lines published since the sidecar started.
    pub lines: u64,
}
