//! The fleet: sidecars sharing policy, locks and decision logs over NATS JetStream, with signed pushes and a fail-closed staleness bound.
//!
//! # Parts
//! - [`signed`]: the envelope every pushed value travels in, and its verification.
//! - [`bundle`]: what is pushed (a policy bundle, a lock, a lock's removal) and the names of
//!   keys and subjects.
//! - [`client`]: the NATS connection, authenticated with the sidecar's (or operator's) SVID.
//! - [`sync`]: the sidecar's task that reads the bucket and applies what it verifies.
//! - [`publish`]: the sidecar's task that copies its decision lines and chain heads off-host.
//! - [`remote`]: what the CLI reads back (`audit verify --fleet`, `audit detect --fleet`).
//!
//! # Fail closed
//! NATS carries; it is not trusted. A value is applied only when an admin's SVID signed it
//! for its key (see [`signed`]), a policy only when its version is above the one in force.
//! When the bucket cannot be read, the sidecar keeps the last good state; once that is older
//! than `[fleet] max_staleness`, new connections are refused (`on_stale = "refuse"`, the
//! default) until a read succeeds again.

pub mod bundle;
pub mod client;
pub mod publish;
pub mod remote;
pub mod signed;
pub mod sync;

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use eastwall_config::{FleetSettings, OnStale};

/// The SQLSTATE a connection refused for staleness gets: PostgreSQL's "cannot connect now".
pub const STALE_SQLSTATE: &str = "57P03";
/// The decision-log reason for it.
pub const STALE_REASON: &str = "fleet_stale";

/// A running sidecar's view of the fleet.
pub struct Fleet {
    pub settings: FleetSettings,
    state: Mutex<State>,
}

struct State {
    /// When the bucket was last read in full; at start, the start (the local state is the
    /// last good one until then).
    contact: SystemTime,
    /// Whether a read has ever succeeded.
    synced: bool,
    /// The fleet policy version in force (0: the local file's policy).
    policy_version: u64,
}

impl Fleet {
    pub fn new(settings: FleetSettings, now: SystemTime) -> Self {
        Fleet {
            settings,
            state: Mutex::new(State {
                contact: now,
                synced: false,
                policy_version: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a successful read of the whole bucket.
    pub fn contact(&self, now: SystemTime) {
        let mut s = self.lock();
        s.contact = now;
        s.synced = true;
    }

    /// Sets the time of the last good read, from the cache at start (never later than now).
    pub fn set_contact(&self, at: SystemTime) {
        let mut s = self.lock();
        s.contact = at.min(SystemTime::now());
    }

    /// How long since the last successful read.
    pub fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.lock().contact).unwrap_or_default()
    }

    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    /// Whether the last good state is past `max_staleness`.
    pub fn stale(&self, now: SystemTime) -> bool {
        self.staleness(now) > self.settings.max_staleness
    }

    /// The refusal message for a new connection, when the fleet is stale and the settings
    /// say to refuse.
    pub fn refusal(&self, now: SystemTime) -> Option<String> {
        if self.settings.on_stale == OnStale::Serve || !self.stale(now) {
            return None;
        }
        Some(format!(
            "the fleet control plane has been out of reach for {} (more than [fleet] max_staleness, {}); new connections are refused until it is back",
            humantime::format_duration(Duration::from_secs(self.staleness(now).as_secs())),
            humantime::format_duration(self.settings.max_staleness),
        ))
    }

    pub fn policy_version(&self) -> u64 {
        self.lock().policy_version
    }

    pub fn set_policy_version(&self, version: u64) {
        self.lock().policy_version = version;
    }
}
