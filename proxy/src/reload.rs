//! Configuration reload: a changed `eastwall.toml` or policy file (or SIGHUP) is loaded whole;
//! a valid one replaces the policy (segments, groups and rules) and re-judges every live
//! session, ending those it no longer allows (`policy_changed`); an invalid one is refused as
//! a whole, logged, and the configuration in force stays.
//!
//! Settings other than the policy (listen address, upstream, limits, …) are read but not
//! applied to a running sidecar: the reload line names them under `restart_needed`, so an
//! operator sees that the change waits for a restart instead of believing it took effect.
//! TLS files, the CRL, locks and MFA secrets have their own watchers (the upkeep tick).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use eastwall_config::{authorize, Config, Request, Settings, Verdict};
use serde_json::json;

use crate::audit::Entry;
use crate::relay::EndReason;
use crate::sidecar::Sidecar;

/// How a file looked the last time: any change (rename, rewrite, chmod) reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    ctime: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        modified: meta.modified().ok(),
        ctime: meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
    })
}

/// The files a reload reads, how they looked when last loaded, and a pending SIGHUP.
pub struct ConfigWatch {
    files: Vec<PathBuf>,
    seen: Mutex<Vec<Option<Stamp>>>,
    requested: AtomicBool,
}

impl ConfigWatch {
    pub fn new(settings: &Settings) -> Self {
        let files = vec![settings.path.clone(), settings.policy_file.clone()];
        let seen = files.iter().map(|f| stamp(f)).collect();
        Self {
            files,
            seen: Mutex::new(seen),
            requested: AtomicBool::new(false),
        }
    }

    /// Asks for a reload at the next upkeep tick whether or not a file changed (SIGHUP).
    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }

    /// Whether a reload is due; the new stamps are remembered either way, so a broken file
    /// is reported once, not on every tick.
    fn due(&self) -> bool {
        let now: Vec<Option<Stamp>> = self.files.iter().map(|f| stamp(f)).collect();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *seen != now;
        *seen = now;
        self.requested.swap(false, Ordering::Relaxed) || changed
    }
}

/// What a reload did, for the caller and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Refused(String),
    Applied { sessions_ended: usize },
}

/// Reloads when a watched file changed or a reload was requested.
pub async fn check(sidecar: &Sidecar) -> Outcome {
    if !sidecar.config_watch.due() {
        return Outcome::Unchanged;
    }
    let path = sidecar.settings.path.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
    let config = match loaded {
        Ok(Ok(config)) => config,
        Ok(Err(err)) => return refuse(sidecar, err.lines().join("; ")).await,
        Err(err) => return refuse(sidecar, format!("the reload task failed: {err}")).await,
    };
    apply(sidecar, config).await
}

async fn refuse(sidecar: &Sidecar, why: String) -> Outcome {
    tracing::error!(error = %why, "configuration reload refused; the configuration in force stays");
    let mut why = why;
    crate::refusals::cap_in_place(&mut why, 2048);
    let mut entry = reload_entry("error");
    entry.reason = "config_invalid".into();
    entry.alert = true;
    entry.extra.insert("detail".into(), json!(why));
    sidecar.write(entry).await;
    Outcome::Refused(why)
}

fn reload_entry(result: &str) -> Entry {
    let mut entry = Entry {
        conn_id: crate::identity::new_conn_id(),
        event: "config_reload",
        ..Entry::default()
    };
    entry.extra.insert("result".into(), json!(result));
    entry
}

/// The settings that differ from the running ones and wait for a restart.
fn restart_needed(running: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differ = |key, same: bool| {
        if !same {
            keys.push(key);
        }
    };
    differ("trust_domain", running.trust_domain == new.trust_domain);
    differ("guards", running.guards == new.guards);
    differ("service_port", running.service_port == new.service_port);
    differ("listen", running.listen == new.listen);
    differ("upstream", running.upstream == new.upstream);
    differ("mfa", running.mfa == new.mfa);
    differ("audit", running.audit == new.audit);
    differ("limits", running.limits == new.limits);
    differ("admin", running.admin == new.admin);
    differ("locks", running.locks_file == new.locks_file);
    differ("detect", running.detect == new.detect);
    differ("fleet", running.fleet == new.fleet);
    keys
}

async fn apply(sidecar: &Sidecar, config: Config) -> Outcome {
    let Config { settings, policy } = config;
    let waiting = restart_needed(&sidecar.settings, &settings);
    // A fleet policy, once received, is the one in force: the file's waits (the line says so)
    // rather than two sources taking turns.
    let fleet_version = sidecar.fleet.as_ref().map_or(0, |f| f.policy_version());
    let (ended, counts) = if fleet_version > 0 {
        (0, sidecar.policy().counts())
    } else {
        let counts = policy.counts();
        (put_in_force(sidecar, policy), counts)
    };
    tracing::info!(
        rules = sidecar.policy().rule_count(),
        sessions_ended = ended,
        restart_needed = ?waiting,
        "configuration reloaded"
    );
    let mut entry = reload_entry("ok");
    entry.reason = "reloaded".into();
    entry.extra.insert(
        "rules".into(),
        json!({"allow": counts.allow, "deny": counts.deny, "deny_and_alert": counts.deny_and_alert}),
    );
    entry.extra.insert("sessions_ended".into(), json!(ended));
    if fleet_version > 0 {
        entry.extra.insert(
            "policy_source".into(),
            json!(format!("fleet version {fleet_version}; the policy file is not applied while a fleet policy is in force")),
        );
    }
    if !waiting.is_empty() {
        entry.extra.insert("restart_needed".into(), json!(waiting));
    }
    sidecar.write(entry).await;
    Outcome::Applied {
        sessions_ended: ended,
    }
}

/// Puts `policy` in force and re-judges every live session as if it arrived now (an
/// operator's session counts as stepped up: it did, at admission), ending those it no
/// longer allows. Returns how many ended. A file reload and a fleet push both come here.
pub fn put_in_force(sidecar: &Sidecar, policy: eastwall_config::Policy) -> usize {
    // The policy is judged for the running sidecar's own segment and port.
    let roles = Arc::new(crate::sidecar::mfa_roles(&sidecar.settings, &policy));
    let policy = Arc::new(policy);
    *sidecar.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
    *sidecar.mfa_roles.write().unwrap_or_else(|p| p.into_inner()) = roles.clone();
    let settings_now = &sidecar.settings;
    sidecar.sessions.end_matching(|info| {
        let decision = authorize(
            &policy,
            &Request {
                id: &info.spiffe_id,
                source: info.source.ip(),
                segment: &settings_now.guards,
                port: settings_now.service_port,
                user: &info.role,
                database: &info.database,
                mfa_fresh: info.mfa.is_some(),
                mfa_roles: Some(&roles),
            },
        );
        (decision.verdict != Verdict::Allow).then_some(EndReason::PolicyChanged)
    })
}
