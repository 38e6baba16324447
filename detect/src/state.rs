//! [`State`]: every table the detectors keep, bounded, and its versioned JSON form for the state file beside the log.

use serde::{Deserialize, Serialize};

use crate::credential::{CertUse, Failures};
use crate::fan_out::Reach;
use crate::new_flow::Profile;
use crate::settings::Settings;
use crate::shared_admin::RoleUse;
use crate::time::{Time, MAX_YEAR};
use crate::window::Table;

/// `format` of a state file: a file without it is someone else's.
pub const FORMAT: &str = "eastwall-detect-state";
/// The layout this build writes and reads. A change that older builds cannot read bumps it.
pub const VERSION: u32 = 1;

/// Why a saved state cannot be loaded. The caller reports it and starts afresh (learning
/// again) or refuses to start; the detectors never guess at a damaged file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("detector state is not readable JSON of the expected shape: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("detector state has format {found:?}, not \"eastwall-detect-state\": it is not an Eastwall detector state")]
    Foreign { found: String },
    #[error("detector state is version {found}; this build reads version 1")]
    Version { found: u32 },
    #[error("detector state is implausible: {0}")]
    Implausible(&'static str),
}

/// Everything the detectors remember. Each table holds at most `max_keys` keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: String,
    pub version: u32,
    /// Time of the first event ever observed: learning runs from here.
    pub started: Option<Time>,
    /// Latest event time observed. Windows run on this clock, which never goes back: a
    /// line dated earlier than one before it is judged as if it came now.
    pub clock: Time,
    /// Per identity: learned sources, databases, roles and (for people) hours.
    pub profiles: Table<String, Profile>,
    /// Per privileged role: recent identities and sources (`shared_admin`).
    pub roles: Table<String, RoleUse>,
    /// Per certificate serial: sources with open sessions (`credential_anomaly`).
    pub certs: Table<String, CertUse>,
    /// Per subject: recent failures (MFA answers, revoked or expired certificates).
    pub failures: Table<String, Failures>,
    /// Per source and per identity: recent targets (`fan_out`).
    pub reach: Table<String, Reach>,
    /// De-duplication: when each (signal, kind, subject) last fired.
    pub fired: Table<String, Time>,
}

impl State {
    pub fn new(settings: &Settings) -> State {
        let cap = settings.max_keys;
        State {
            format: FORMAT.into(),
            version: VERSION,
            started: None,
            clock: Time::default(),
            profiles: Table::new(cap),
            roles: Table::new(cap),
            certs: Table::new(cap),
            failures: Table::new(cap),
            reach: Table::new(cap),
            fired: Table::new(cap),
        }
    }

    /// Reads a saved state; its tables are cut to today's `max_keys`.
    pub fn load(settings: &Settings, text: &str) -> Result<State, StateError> {
        // The header first, so a foreign or newer file is named as such rather than as a
        // confusing "unknown field".
        #[derive(Deserialize)]
        struct Header {
            format: Option<String>,
            version: Option<u32>,
        }
        let header: Header = serde_json::from_str(text)?;
        match header.format {
            Some(f) if f == FORMAT => {}
            found => {
                return Err(StateError::Foreign {
                    found: found.unwrap_or_default(),
                })
            }
        }
        if header.version != Some(VERSION) {
            return Err(StateError::Version {
                found: header.version.unwrap_or(0),
            });
        }
        let state: State = serde_json::from_str(text)?;
        let latest = Time::parse_rfc3339(&format!("{MAX_YEAR}-12-31T23:59:59Z"))
            .ok_or(StateError::Implausible("no latest time"))?;
        if state.clock > latest || state.started.is_some_and(|s| s > state.clock) {
            return Err(StateError::Implausible(
                "its clock is beyond the year limit or before its start",
            ));
        }
        Ok(state.with_cap(settings.max_keys))
    }

    fn with_cap(self, cap: usize) -> State {
        State {
            profiles: self.profiles.with_cap(cap),
            roles: self.roles.with_cap(cap),
            certs: self.certs.with_cap(cap),
            failures: self.failures.with_cap(cap),
            reach: self.reach.with_cap(cap),
            fired: self.fired.with_cap(cap),
            ..self
        }
    }

    /// The JSON to persist.
    pub fn save(&self) -> String {
        // Only strings, numbers and sequences: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// An estimate of the memory the tables hold.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.profiles.approx_bytes()
            + self.roles.approx_bytes()
            + self.certs.approx_bytes()
            + self.failures.approx_bytes()
            + self.reach.approx_bytes()
            + self.fired.approx_bytes()
    }

    /// The largest table's length, to check the bound.
    pub fn largest_table(&self) -> usize {
        [
            self.profiles.len(),
            self.roles.len(),
            self.certs.len(),
            self.failures.len(),
            self.reach.len(),
            self.fired.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }
}
